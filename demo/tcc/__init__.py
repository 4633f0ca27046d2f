"""The seed's TCC pay-order, the demo's second part (shared/DESIGN.md §8, §11).

- :mod:`.shop`: the four participants (order, inventory, credit, wms), each over a schema
  of its own, with the demo's injected faults; the order service is also the initiator;
- :mod:`.books`: their tables, reset and seeded before the part, read after it;
- :mod:`.plan`: which order meets which fault;
- :mod:`.phase`: the part itself, from starting the participants to the facts;
- :mod:`.verdict`: do the TCC books balance?

``python -m demo.tcc <participant> --port P`` serves one participant (the runner starts
them).
"""

"""The fault-injection soak run: the demo topology (two service instances, the order
service, three consumers) paying thousands of orders while processes are killed and
RabbitMQ, PostgreSQL and the network fail, then a count of what was lost, applied twice
or left stuck. ``make soak`` runs the long form, ``python -m soak --short`` the short."""

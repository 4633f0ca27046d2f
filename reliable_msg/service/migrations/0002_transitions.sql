-- The history of every move of a message and of its deliveries, for operators (the
-- dashboard and `reliable-msg messages show`). The store writes a row in the same
-- statement as the move itself, so the history never disagrees with the state.
CREATE TABLE rmsg_transition (
    -- insertion order: the order of a message's moves (its row locks serialise them)
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    -- purged with its message
    message_id   text        NOT NULL REFERENCES rmsg_message (id) ON DELETE CASCADE,
    -- NULL for a move of the message, the group for a move of one delivery
    group_name   text,
    -- NULL for the prepare that created the message
    from_status  text,
    to_status    text        NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    reason       text
);

-- A message's history, in order; also what the purge's cascade looks up.
CREATE INDEX rmsg_transition_message ON rmsg_transition (message_id, seq);

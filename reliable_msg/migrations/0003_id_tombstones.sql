-- The ids of purged messages (README, "Guarantees"): a prepare with one of them
-- is refused, so an id names one message for ever and a consumer's inbox (keyed by the
-- id) can never take a new message for a repeat. About 50 bytes a purged message.
CREATE TABLE rmsg_id_tombstone (
    id          text        PRIMARY KEY,
    producer    text        NOT NULL,
    purged_at   timestamptz NOT NULL DEFAULT now()
);

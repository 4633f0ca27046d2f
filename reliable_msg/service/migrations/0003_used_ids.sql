-- Every message id ever prepared (README, "Guarantees"): the prepare claims its id here
-- first, so an id names one message for ever, also after the retention purge deleted the
-- message, and a consumer's inbox (keyed by the id) never takes a new message for a
-- repeat. The unique index decides between concurrent prepares and a purge. About 165
-- bytes an id; the message purge leaves these rows, scanner.id_retention frees old ones.
CREATE TABLE rmsg_used_id (
    id          text        PRIMARY KEY,
    producer    text        NOT NULL,
    used_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO rmsg_used_id (id, producer, used_at) SELECT id, producer, created_at FROM rmsg_message;

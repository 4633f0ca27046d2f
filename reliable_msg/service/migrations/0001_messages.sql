-- Messages and their per-group deliveries (DESIGN §1-§3).
CREATE TABLE rmsg_message (
    id              text        PRIMARY KEY,
    topic           text        NOT NULL,
    producer        text        NOT NULL,
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}',
    key             text,
    status          text        NOT NULL,
    -- subscribers fixed at prepare time; one delivery each is created at confirm
    groups          text[]      NOT NULL,
    -- deliveries not yet done; the message is done when it reaches 0
    remaining       integer     NOT NULL DEFAULT 0,
    check_attempts  integer     NOT NULL DEFAULT 0,
    next_check_at   timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    finished_at     timestamptz,
    CONSTRAINT rmsg_message_status CHECK
        (status IN ('pending', 'sent', 'done', 'cancelled', 'dead'))
) WITH (fillfactor = 80);

-- Check-back scanner: only pending rows are indexed, so a pass costs the due rows.
CREATE INDEX rmsg_message_check_due ON rmsg_message (next_check_at)
    WHERE status = 'pending';
-- Retention purge: only finished rows.
CREATE INDEX rmsg_message_finished ON rmsg_message (finished_at)
    WHERE status IN ('done', 'cancelled');
-- Admin listing and counts by status / topic, newest first.
CREATE INDEX rmsg_message_status_created ON rmsg_message (status, created_at, id);
CREATE INDEX rmsg_message_topic_created ON rmsg_message (topic, created_at, id);
CREATE INDEX rmsg_message_created ON rmsg_message (created_at, id);

CREATE TABLE rmsg_delivery (
    message_id      text        NOT NULL REFERENCES rmsg_message (id) ON DELETE CASCADE,
    group_name      text        NOT NULL,
    status          text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 1,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    done_at         timestamptz,
    PRIMARY KEY (message_id, group_name),
    CONSTRAINT rmsg_delivery_status CHECK (status IN ('sent', 'done', 'dead'))
) WITH (fillfactor = 80);

-- Redelivery scanner: only unacked deliveries are indexed.
CREATE INDEX rmsg_delivery_due ON rmsg_delivery (next_attempt_at)
    WHERE status = 'sent';
-- Requeue and listing of dead deliveries per group.
CREATE INDEX rmsg_delivery_group_status ON rmsg_delivery (group_name, status);

-- The TCC coordinator (DESIGN §11, issue 13): transactions, their branches, and the
-- activity log of every call. Statuses and their moves: reliable_msg/service/tcc/states.py
-- (the CHECKs below list exactly its TxStatus and BranchStatus). Every time is the
-- database's now(), never an instance's clock.
CREATE TABLE rmsg_tcc_transaction (
    gid          text        PRIMARY KEY,
    -- the producer that began it (its token)
    initiator    text        NOT NULL,
    status       text        NOT NULL,
    -- what the begin asked for (at most tcc.max_timeout); the deadline is now() + timeout
    -- at the begin (the database's clock), past which a trying transaction expires
    timeout      interval    NOT NULL,
    deadline     timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- set by the move to confirmed or cancelled, and only then (the retention purge's key)
    finished_at  timestamptz,
    -- when the driver next looks at it: the earliest next try of its registered branches
    -- while confirming or cancelling (NULL: at once); unused while trying (the deadline)
    next_try_at  timestamptz,
    -- rounds of Confirm or Cancel calls made for it
    attempts     integer     NOT NULL DEFAULT 0,
    -- confirming or cancelling for longer than tcc.stalled_after; still retried
    stalled      boolean     NOT NULL DEFAULT false,
    -- the instance driving it, until lease_until; another claims it after that
    lease_owner  text,
    lease_until  timestamptz,
    CONSTRAINT rmsg_tcc_transaction_status CHECK
        (status IN ('trying', 'confirming', 'confirmed', 'cancelling', 'cancelled')),
    CONSTRAINT rmsg_tcc_transaction_finished CHECK
        ((finished_at IS NOT NULL) = (status IN ('confirmed', 'cancelled'))),
    CONSTRAINT rmsg_tcc_transaction_timeout CHECK
        (timeout > interval '0' AND deadline > created_at),
    CONSTRAINT rmsg_tcc_transaction_attempts CHECK (attempts >= 0),
    CONSTRAINT rmsg_tcc_transaction_lease CHECK
        ((lease_owner IS NULL) = (lease_until IS NULL))
) WITH (fillfactor = 80);

-- The driver: transactions to confirm or cancel, by when they are due. Only unfinished
-- rows are indexed, so a pass costs the rows in flight.
CREATE INDEX rmsg_tcc_transaction_due ON rmsg_tcc_transaction (next_try_at NULLS FIRST)
    WHERE status IN ('confirming', 'cancelling');
-- The deadline scanner: trying transactions by deadline (EXPIRE).
CREATE INDEX rmsg_tcc_transaction_deadline ON rmsg_tcc_transaction (deadline)
    WHERE status = 'trying';
-- Stalled transactions: the metric, the admin list's filter.
CREATE INDEX rmsg_tcc_transaction_stalled ON rmsg_tcc_transaction (created_at, gid)
    WHERE stalled;
-- Retention purge: only finished rows.
CREATE INDEX rmsg_tcc_transaction_finished_at ON rmsg_tcc_transaction (finished_at)
    WHERE status IN ('confirmed', 'cancelled');
-- Admin listing and counts by status / initiator, newest first.
CREATE INDEX rmsg_tcc_transaction_status_created ON rmsg_tcc_transaction
    (status, created_at, gid);
CREATE INDEX rmsg_tcc_transaction_initiator_created ON rmsg_tcc_transaction
    (initiator, created_at, gid);
CREATE INDEX rmsg_tcc_transaction_created ON rmsg_tcc_transaction (created_at, gid);

CREATE TABLE rmsg_tcc_branch (
    -- purged with its transaction
    gid          text        NOT NULL REFERENCES rmsg_tcc_transaction (gid) ON DELETE CASCADE,
    branch       text        NOT NULL,
    -- a declared [participants.<name>]: the only URL ever called for it comes from there
    participant  text        NOT NULL,
    payload      jsonb       NOT NULL,
    status       text        NOT NULL,
    -- Confirm or Cancel calls made (Try is the initiator's call)
    attempts     integer     NOT NULL DEFAULT 0,
    -- when its next Confirm or Cancel is due after a failure (NULL: at once)
    next_try_at  timestamptz,
    last_error   text,
    -- the HTTP status of its last call; NULL when it got none (refused, timed out)
    last_status  integer,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gid, branch),
    CONSTRAINT rmsg_tcc_branch_status CHECK
        (status IN ('registered', 'confirmed', 'cancelled')),
    CONSTRAINT rmsg_tcc_branch_attempts CHECK (attempts >= 0)
) WITH (fillfactor = 80);

-- The admin list's participant filter: transactions with a branch at this participant.
CREATE INDEX rmsg_tcc_branch_participant ON rmsg_tcc_branch (participant, gid);

-- The activity log (the seed's): every call of a branch and every move of a transaction,
-- with its outcome. Append-only: the trigger below refuses every UPDATE, and every DELETE
-- except the retention purge's, which sets rmsg.tcc_purge (constants.TCC_PURGE_SETTING)
-- in its own transaction and deletes finished transactions, their events by cascade.
-- TRUNCATE is not guarded: it is an operator's reset of the whole table, not a purge.
CREATE TABLE rmsg_tcc_event (
    -- insertion order: the order of a transaction's events (its row lock serialises them)
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gid          text        NOT NULL REFERENCES rmsg_tcc_transaction (gid) ON DELETE CASCADE,
    -- NULL for an event of the whole transaction (begin, commit, cancel, expire)
    branch       text,
    -- what happened: a move (begin, register, commit, cancel, expire, ...) or a call
    -- (try, confirm, cancel); free text, the coordinator's code names them
    op           text        NOT NULL,
    -- how it ended (ok, refused, failed, ...)
    outcome      text        NOT NULL,
    -- the participant's HTTP status; NULL for a move, or a call that got no answer
    http_status  integer,
    error        text,
    -- the instance that made the call or the move
    instance     text,
    at           timestamptz NOT NULL DEFAULT now()
);

-- A transaction's log, in order; also what the purge's cascade looks up.
CREATE INDEX rmsg_tcc_event_gid ON rmsg_tcc_event (gid, id);

CREATE FUNCTION rmsg_tcc_event_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('rmsg.tcc_purge', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'rmsg_tcc_event is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'only the retention purge deletes events (SET LOCAL rmsg.tcc_purge = on)';
END;
$$;

CREATE TRIGGER rmsg_tcc_event_append_only
    BEFORE UPDATE OR DELETE ON rmsg_tcc_event
    FOR EACH ROW EXECUTE FUNCTION rmsg_tcc_event_append_only();

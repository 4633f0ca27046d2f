-- Every gid the TCC retention purge deleted (README, "TCC"): a participant's barrier keeps
-- its rows for a gid after the coordinator forgot it, so a new transaction with an old gid
-- would have its Try and Confirm answered as repeats and end confirmed having done nothing.
-- The purge records each gid here in the database transaction of its delete; a begin with
-- one is refused (409 id_reused). scanner.id_retention frees the rows that long after the
-- purge, as it frees the ids of purged messages (rmsg_used_id).
CREATE TABLE rmsg_tcc_used_gid (
    gid        text        PRIMARY KEY,
    -- the producer that began it
    initiator  text        NOT NULL,
    -- when the purge deleted it: scanner.id_retention counts from here
    purged_at  timestamptz NOT NULL DEFAULT now()
);
-- The purge of old rows (scanner.id_retention).
CREATE INDEX rmsg_tcc_used_gid_purged_at ON rmsg_tcc_used_gid (purged_at);

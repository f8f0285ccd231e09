-- compatible-with: 1
-- A heartbeat that never waits and can never deadlock with a completion. The same
-- worker completes and heartbeats from two connections, and both update the rows of
-- jobs whose outcomes are in flight; in plan-dependent order, two such statements can
-- deadlock. heartbeat_v2 skips the rows that are locked (a completion is writing them:
-- their lease no longer matters) and says, for every id still this worker's, whether
-- its lease was extended; an attempt it does not return at all is no longer this
-- worker's (its lease expired and a rescue took it), and the worker stops it. Attempts,
-- not just ids: the same worker may have claimed the rescued job again meanwhile.
create function pgqueue.heartbeat_v2(
    p_worker text,
    p_ids bigint[],
    p_attempts integer[],
    p_lease_seconds double precision,
    p_now timestamptz default null
) returns table (id bigint, attempt integer, extended boolean)
-- planned for the actual ids on every call (see heartbeat in 0001)
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
#variable_conflict use_column
begin
    return query
    with mine as (
        select j.id, j.attempt
        from pgqueue.jobs j
        join unnest(p_ids, p_attempts) as held(id, attempt) on held.id = j.id and held.attempt = j.attempt
        where j.state = 'running' and j.worker = p_worker
    ),
    locked as (
        select j.id from pgqueue.jobs j
        where j.id in (select m.id from mine m) and j.state = 'running' and j.worker = p_worker
        order by j.id
        for update skip locked
    ),
    updated as (
        update pgqueue.jobs j
        set lease_expires_at = coalesce(p_now, now()) + make_interval(secs => p_lease_seconds)
        from locked l
        where j.id = l.id
        returning j.id
    )
    select m.id, m.attempt, true from mine m where m.id in (select u.id from updated u)
    union all
    select m.id, m.attempt, false from mine m where m.id not in (select u.id from updated u);
end
$$;

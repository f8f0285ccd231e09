-- compatible-with: 1
-- A heartbeat that never waits and can never deadlock with a completion. The same
-- worker completes and heartbeats from two connections, and both update the rows of
-- jobs whose outcomes are in flight; in plan-dependent order, two such statements can
-- deadlock. heartbeat_v2 skips the rows that are locked (a completion is writing them:
-- their lease no longer matters) and says, for every id still this worker's, whether
-- its lease was extended; an id it does not return at all is no longer this worker's
-- (its lease expired and a rescue took it), and the worker stops that job.
create function pgqueue.heartbeat_v2(
    p_worker text,
    p_ids bigint[],
    p_lease_seconds double precision,
    p_now timestamptz default null
) returns table (id bigint, extended boolean)
-- planned for the actual ids on every call (see heartbeat in 0001)
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
#variable_conflict use_column
begin
    return query
    with mine as (
        select j.id from pgqueue.jobs j
        where j.id = any(p_ids) and j.state = 'running' and j.worker = p_worker
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
    select u.id, true from updated u
    union all
    select m.id, false from mine m where m.id not in (select u.id from updated u);
end
$$;

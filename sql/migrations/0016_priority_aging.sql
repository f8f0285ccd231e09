-- compatible-with: 1
-- Priorities without starvation. Claims take the highest priority first (0008), so under
-- a steady stream of urgent jobs a low-priority one could wait forever. The maintenance
-- leader ages them: a job due for longer than the aging interval (setting
-- priority_aging, 5 minutes by default) is promoted to the highest priority waiting in
-- its queue, where its age puts it first in line. So no job waits much longer than the
-- interval plus the time to run the top-level jobs already older than it.
--
-- Its `priority` column then shows the promoted value. The claim path is unchanged: it
-- costs nothing until a job has waited that long, and then one index update per job.

create function pgqueue.age_priorities(
    p_after interval,
    p_limit integer default 1000,
    p_now timestamptz default null
) returns integer
language plpgsql volatile as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_queue text;
    v_top smallint;
    v_level smallint;
    v_aged integer := 0;
    v_count integer;
begin
    if p_after is null or p_after <= interval '0' then
        raise exception 'pgqueue.age_priorities: the interval must be positive, got %', p_after
            using errcode = '22023';
    end if;
    -- each queue with waiting jobs (a skip scan of the claim index)
    for v_queue in
        with recursive queues(name) as (
            (select j.queue from pgqueue.active_jobs j where j.state = 'queued' order by j.queue limit 1)
            union all
            select (select j.queue from pgqueue.active_jobs j
                    where j.state = 'queued' and j.queue > q.name order by j.queue limit 1)
            from queues q where q.name is not null
        )
        select q.name from queues q where q.name is not null
    loop
        select j.priority into v_top from pgqueue.active_jobs j
        where j.state = 'queued' and j.queue = v_queue order by j.priority desc, j.run_at limit 1;
        -- level by level below the top, oldest first: each an index range, never a sort
        for v_level in
            with recursive levels(priority) as (
                (select j.priority from pgqueue.active_jobs j
                 where j.state = 'queued' and j.queue = v_queue and j.priority < v_top
                 order by j.priority desc limit 1)
                union all
                select (select j.priority from pgqueue.active_jobs j
                        where j.state = 'queued' and j.queue = v_queue and j.priority < l.priority
                        order by j.priority desc limit 1)
                from levels l where l.priority is not null
            )
            select l.priority from levels l where l.priority is not null
        loop
            with starving as (
                select j.id from pgqueue.active_jobs j
                where j.state = 'queued' and j.queue = v_queue and j.priority = v_level
                  and j.run_at <= v_now - p_after
                order by j.run_at
                limit p_limit - v_aged
                for update skip locked
            )
            update pgqueue.active_jobs j set priority = v_top from starving s where j.id = s.id;
            get diagnostics v_count = row_count;
            v_aged := v_aged + v_count;
            exit when v_aged >= p_limit;
        end loop;
        exit when v_aged >= p_limit;
    end loop;
    return v_aged;
end
$$;

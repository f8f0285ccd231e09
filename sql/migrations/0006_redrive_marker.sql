-- compatible-with: 1
-- A redrive starts a new count of lease expiries. The rescue dead-letters a job whose
-- last attempts all ended with an expired lease (a poison job that kills its worker);
-- it counts the lease_expired entries at the end of the job's errors. A job redriven
-- from the dead letter kept those entries, so its first expiry after the redrive
-- dead-lettered it again at once. The redrive now adds an entry of kind 'redriven',
-- which ends that run of expiries and tells the job's history when it was redriven.
create or replace function pgqueue.retry_job(p_id bigint, p_now timestamptz default null)
returns boolean
language plpgsql volatile as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_queue text;
begin
    update pgqueue.jobs j
    set state = 'queued', attempt = 0, run_at = v_now,
        finished_at = null, worker = null, lease_expires_at = null,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', 0, 'at', v_now, 'worker', null, 'kind', 'redriven',
            'error', format('redriven from %s after attempt %s', j.state, j.attempt),
            'traceback', null))
    where j.id = p_id and j.state in ('dead', 'cancelled')
    returning j.queue into v_queue;
    if v_queue is null then
        return false;
    end if;
    perform pg_notify('pgqueue_jobs', v_queue);
    return true;
end
$$;

-- Whether this role reads every session's `pg_stat_activity.xact_start`: it has the
-- privileges of pg_read_all_stats (USAGE: an inherited membership, as pg_stat_activity
-- asks; a superuser has every role's). Columns: the role as SQL writes it, that.
SELECT quote_ident(current_user)::text, pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')

//! The checks of PostgreSQL: reachable, with every grant of `deploy/sql/grants.sql`; no
//! transaction pooler in the way; every migration applied; no INVALID index; the source
//! columns loansync reads; how the sync window's end is capped for this role.

/// The kind of object a grant is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    Schema,
    Table,
    Sequence,
}

/// One `GRANT` of `deploy/sql/grants.sql`.
struct Grant {
    privileges: &'static [&'static str],
    on: On,
    names: &'static [&'static str],
}

/// Django's source tables (read only; `loansync migrate` never creates them).
const SOURCE_TABLES: &[&str] = &[
    "accounts_customuser",
    "ajo_ajouser",
    "loans_ajoloan",
    "loans_ajoloanrepayment",
    "loans_ajoloanschedule",
];

/// What `deploy/sql/grants.sql` grants, statement by statement (a unit test keeps the
/// two the same).
const GRANTS: &[Grant] = &[
    Grant {
        privileges: &["USAGE"],
        on: On::Schema,
        names: &["public"],
    },
    Grant {
        privileges: &["SELECT"],
        on: On::Table,
        names: SOURCE_TABLES,
    },
    Grant {
        privileges: &["SELECT", "INSERT", "UPDATE"],
        on: On::Table,
        names: &[
            "etl_folder_etlsynchistory",
            "etl_folder_etlsyncerror",
            "etl_folder_etllastsync",
        ],
    },
    Grant {
        privileges: &["USAGE"],
        on: On::Sequence,
        names: &[
            "etl_folder_etlsynchistory_id_seq",
            "etl_folder_etlsyncerror_id_seq",
            "etl_folder_etllastsync_id_seq",
        ],
    },
    Grant {
        privileges: &["SELECT", "INSERT", "UPDATE", "DELETE"],
        on: On::Table,
        names: &[
            "loansync_sync",
            "loansync_sync_entity",
            "loansync_chunk",
            "loansync_xid_clock",
            "loansync_request",
            "loansync_delivered",
            "loansync_deleted",
            "loansync_sweep_digest",
        ],
    },
    Grant {
        privileges: &["SELECT"],
        on: On::Table,
        names: &["loansync_pending_request"],
    },
    Grant {
        privileges: &["SELECT", "INSERT", "UPDATE", "DELETE"],
        on: On::Table,
        names: &["loansync_worker"],
    },
    Grant {
        privileges: &["SELECT", "INSERT", "UPDATE"],
        on: On::Table,
        names: &["loansync_api_pause"],
    },
    Grant {
        privileges: &["SELECT"],
        on: On::Table,
        names: &["_sqlx_migrations"],
    },
];

/// A role name as SQL would need it written.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Reachable, and the role holds every grant of `deploy/sql/grants.sql`. Tables that
/// do not exist yet are left to `migrations` (Django's own tables excepted).
pub(super) async fn database(pool: &sqlx::PgPool, at: &str) -> Result<String, String> {
    let e = |e: sqlx::Error| format!("{e}");
    let (role, superuser): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_one(pool)
    .await
    .map_err(e)?;
    let mut missing: Vec<String> = Vec::new();
    let mut absent_sources: Vec<&str> = Vec::new();
    let mut checked = 0;
    for g in GRANTS {
        for name in g.names {
            let mut lacking = Vec::new();
            for privilege in g.privileges {
                let (exists, has): (bool, Option<bool>) = match g.on {
                    On::Schema => sqlx::query_as(
                        "SELECT n.oid IS NOT NULL, has_schema_privilege(n.oid, $2) \
                         FROM (SELECT (SELECT oid FROM pg_namespace WHERE nspname = $1) AS oid) n",
                    ),
                    On::Table => sqlx::query_as(
                        "SELECT to_regclass($1) IS NOT NULL, \
                         has_table_privilege(to_regclass($1)::oid, $2)",
                    ),
                    On::Sequence => sqlx::query_as(
                        "SELECT to_regclass($1) IS NOT NULL, \
                         has_sequence_privilege(to_regclass($1)::oid, $2)",
                    ),
                }
                .bind(*name)
                .bind(*privilege)
                .fetch_one(pool)
                .await
                .map_err(e)?;
                if !exists {
                    if SOURCE_TABLES.contains(name) && !absent_sources.contains(name) {
                        absent_sources.push(name);
                    }
                    break;
                }
                checked += 1;
                if has != Some(true) {
                    lacking.push(*privilege);
                }
            }
            if !lacking.is_empty() {
                let on = match g.on {
                    On::Schema => "SCHEMA ",
                    On::Table => "",
                    On::Sequence => "SEQUENCE ",
                };
                missing.push(format!(
                    "GRANT {} ON {on}{name} TO {};",
                    lacking.join(", "),
                    quote_ident(&role)
                ));
            }
        }
    }
    let mut problems = Vec::new();
    if !absent_sources.is_empty() {
        problems.push(format!(
            "Django's table(s) {} do not exist: does DATABASE_URL point at the lending database?",
            absent_sources.join(", ")
        ));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "role {role} lacks {} grant(s) of deploy/sql/grants.sql; as the tables' owner run: {}",
            missing.len(),
            missing.join(" ")
        ));
    }
    if !problems.is_empty() {
        return Err(format!("{at}: {}", problems.join("; ")));
    }
    Ok(format!(
        "{at} as {role}{}: {checked} privileges of deploy/sql/grants.sql held",
        if superuser { " (superuser)" } else { "" }
    ))
}

/// Each connection keeps a server session of its own: no transaction pooler between
/// loansync and PostgreSQL ([`crate::db::pooling::detect`]), which the planning lock
/// cannot work through.
pub(super) async fn pooling(pool: &sqlx::PgPool) -> Result<String, String> {
    let seen = crate::db::pooling::detect(pool)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let [a, b] = seen.backends;
    Ok(format!(
        "two connections kept their own server sessions (backends {a} and {b}) over {} \
         transactions: no transaction pooler",
        seen.transactions
    ))
}

/// Every migration embedded in this binary is applied, successfully, unchanged.
pub(super) async fn migrations(pool: &sqlx::PgPool) -> Result<String, String> {
    let ours: Vec<&sqlx::migrate::Migration> = crate::db::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    if !exists {
        return Err(format!(
            "not migrated: none of the {} migrations is applied (no _sqlx_migrations table); \
             run `loansync migrate` as the tables' owner",
            ours.len()
        ));
    }
    let applied: Vec<(i64, bool, Vec<u8>)> = sqlx::query_as(
        "SELECT version, success, checksum FROM _sqlx_migrations",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| {
        format!("cannot read _sqlx_migrations ({e}); GRANT SELECT ON _sqlx_migrations to this role")
    })?;
    let name = |m: &sqlx::migrate::Migration| format!("{} {}", m.version, m.description);
    let (mut missing, mut failed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for m in &ours {
        match applied.iter().find(|(v, _, _)| *v == m.version) {
            None => missing.push(name(m)),
            Some((_, false, _)) => failed.push(name(m)),
            Some((_, true, sum)) if sum.as_slice() != m.checksum.as_ref() => changed.push(name(m)),
            Some(_) => {}
        }
    }
    let unknown = applied
        .iter()
        .filter(|(v, _, _)| !ours.iter().any(|m| m.version == *v))
        .count();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {} not applied ({}): run `loansync migrate`",
            missing.len(),
            ours.len(),
            missing.join(", ")
        ));
    }
    if !failed.is_empty() {
        problems.push(format!(
            "failed ({}): see the migrate Job's log, fix the cause, run `loansync migrate` again",
            failed.join(", ")
        ));
    }
    if !changed.is_empty() {
        problems.push(format!(
            "applied with a different checksum ({}): this binary's migration differs from the one \
             the database ran; deploy the release that migrated it, or restore the migration",
            changed.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(format!(
        "all {} migrations applied{}",
        ours.len(),
        if unknown > 0 {
            format!(" ({unknown} more applied by a newer release)")
        } else {
            String::new()
        }
    ))
}

/// No INVALID index (an interrupted `CREATE INDEX CONCURRENTLY`) on the tables loansync uses.
pub(super) async fn indexes(pool: &sqlx::PgPool) -> Result<String, String> {
    let invalid: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, t.relname::text \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid \
         WHERE NOT i.indisvalid AND pg_table_is_visible(t.oid) \
           AND (t.relname = ANY($1) OR t.relname LIKE 'loansync\\_%' OR t.relname LIKE 'etl\\_folder\\_%') \
         ORDER BY 1",
    )
    .bind(SOURCE_TABLES)
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    if invalid.is_empty() {
        return Ok("no INVALID index on the source, etl_folder_* or loansync_* tables".into());
    }
    Err(format!(
        "INVALID index(es) (an interrupted CREATE INDEX CONCURRENTLY): {}; \
         run {} then `loansync migrate` again",
        invalid
            .iter()
            .map(|(i, t)| format!("{i} on {t}"))
            .collect::<Vec<_>>()
            .join(", "),
        invalid
            .iter()
            .map(|(i, _)| format!("DROP INDEX CONCURRENTLY {};", quote_ident(i)))
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// Every source column loansync reads is there with a type its statements read
/// ([`crate::source::columns`]): a renamed, dropped or retyped column, or a missing
/// table, is named with what was expected and what was found.
pub(super) async fn schema(pool: &sqlx::PgPool) -> Result<String, String> {
    use crate::source::columns::{SOURCE_COLUMNS, drift, drift_message};
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    let drifts = drift(&mut conn).await.map_err(|e| e.to_string())?;
    if !drifts.is_empty() {
        return Err(drift_message(&drifts));
    }
    let tables: std::collections::BTreeSet<&str> = SOURCE_COLUMNS.iter().map(|c| c.table).collect();
    Ok(format!(
        "the {} source columns loansync reads are there, with the types it reads ({} tables)",
        SOURCE_COLUMNS.len(),
        tables.len()
    ))
}

/// How the sync window's end is capped for this role (SPEC.md section 2): at each open
/// transaction's start, or, when the role cannot read other roles' `xact_start`, at
/// their first write. Ok either way; the second with a warning naming the grant that
/// closes the case it leaves open.
pub(super) async fn window(pool: &sqlx::PgPool) -> Result<String, String> {
    use crate::ledger::clock::{WindowCap, window_cap};
    match window_cap(pool).await.map_err(|e| e.to_string())? {
        cap @ WindowCap::TransactionStart => Ok(cap.to_string()),
        cap @ WindowCap::FirstWrite { .. } => Ok(format!("warning: {cap}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grants the check asks for are exactly the grants of deploy/sql/grants.sql.
    #[test]
    fn the_grants_checked_are_those_of_the_deploy_file() {
        let file = include_str!("../../deploy/sql/grants.sql");
        let sql: String = file
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ");
        let mut from_file: Vec<(String, String, String)> = Vec::new();
        for stmt in sql.split(';') {
            let stmt = stmt.split_whitespace().collect::<Vec<_>>().join(" ");
            let Some(rest) = stmt.strip_prefix("GRANT ") else {
                assert!(stmt.is_empty(), "not a GRANT: {stmt}");
                continue;
            };
            let (privs, rest) = rest.split_once(" ON ").unwrap();
            let (objects, role) = rest.rsplit_once(" TO ").unwrap();
            assert_eq!(role, "loansync");
            let (kind, objects) = match objects.split_once(' ') {
                Some((k @ ("SCHEMA" | "SEQUENCE"), o)) => (k, o),
                _ => ("TABLE", objects),
            };
            for p in privs.split(',') {
                for o in objects.split(',') {
                    from_file.push((kind.into(), o.trim().into(), p.trim().into()));
                }
            }
        }
        let mut ours: Vec<(String, String, String)> = Vec::new();
        for g in GRANTS {
            let kind = match g.on {
                On::Schema => "SCHEMA",
                On::Table => "TABLE",
                On::Sequence => "SEQUENCE",
            };
            for p in g.privileges {
                for n in g.names {
                    ours.push((kind.into(), n.to_string(), p.to_string()));
                }
            }
        }
        from_file.sort();
        ours.sort();
        assert_eq!(ours, from_file);
        assert!(ours.len() > 30, "{ours:?}");
    }

    #[test]
    fn role_names_are_quoted_when_sql_needs_it() {
        assert_eq!(quote_ident("loansync"), "loansync");
        assert_eq!(quote_ident("ls_app_1a2b"), "ls_app_1a2b");
        assert_eq!(quote_ident("LoanSync"), "\"LoanSync\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("1x"), "\"1x\"");
    }
}

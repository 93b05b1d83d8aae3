//! The `loansync` command line: parse ([`args`]), set up telemetry, call the application
//! layer ([`crate::app`]), print its report, map it to an exit code. No command's logic
//! lives here: each arm of `run` connects, calls one `app` function, and prints.
//!
//! Exit codes: 0 success (for `sync`: the sync `completed`); 1 an error (configuration,
//! connection, ...); 2 a usage error; the outcomes of a sync are
//! [`app::EXIT_PARTIAL`], [`app::EXIT_FAILED`], [`app::EXIT_BUSY`] and
//! [`app::EXIT_TIMEOUT`] (README "Exit codes").

pub mod args;

use crate::app::sync::{Started, Work};
use crate::app::{self, Report, wait::WAIT_POLL};
use crate::config::Settings;
use crate::{db, telemetry};
use anyhow::Context;
use args::{AppCommand, Cli, Command, DeletesCommand, ErrorsCommand, WatermarkCommand};
use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;

/// Entry point of the binary.
pub fn main() -> ExitCode {
    match Cli::parse().command {
        // Needs no settings: it only describes the command line.
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "loansync",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        // A healthcheck needs no settings: it works whatever the environment holds.
        Command::Probe { url, timeout } => match runtime() {
            Ok(rt) => ExitCode::from(rt.block_on(probe(&url, timeout))),
            Err(code) => code,
        },
        Command::Check {
            json,
            skip,
            timeout,
        } => check(json, &skip, timeout),
        Command::App(command) => run_app(command),
    }
}

/// `loansync check`: a configuration that does not load is its first check, failed.
fn check(json: bool, skip: &[crate::check::CheckName], timeout: std::time::Duration) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            print_check(&crate::check::config_failed(&e), json);
            return ExitCode::from(1);
        }
    };
    // It prints its report: its logs only speak of trouble unless asked.
    let runtime = match start(&settings, "warn") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = runtime.block_on(crate::check::run(&settings, skip, timeout));
    print_check(&report, json);
    ExitCode::from(report.exit_code())
}

/// Runs a command that needs the settings: loads them, refuses a command that calls the
/// API without its settings, and maps an error to 1 (printed without credentials).
fn run_app(command: AppCommand) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loansync: configuration error: {e}");
            return ExitCode::from(1);
        }
    };
    // A build without `dev-tools` has no default API URL or key: a command that calls the
    // API refuses to start without them, before it touches anything.
    if let (Some(command), Err(e)) = (calls_api(&command), settings.api()) {
        eprintln!(
            "loansync: configuration error: {e}; `loansync {command}` calls the analytics API"
        );
        return ExitCode::from(1);
    }
    let default_filter = match &command {
        // The demo prints its own progress: its logs only speak of trouble unless asked.
        #[cfg(feature = "dev-tools")]
        AppCommand::Demo(_) => "warn",
        _ => "info",
    };
    let runtime = match start(&settings, default_filter) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(run(command, settings)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A sync refused for source schema drift has ended `failed` (its history row
            // says why): the exit code of a failed sync.
            let code = match e.downcast_ref::<crate::app::AppError>() {
                Some(crate::app::AppError::Plan(crate::planner::PlanError::SchemaDrift(_))) => {
                    crate::app::EXIT_FAILED
                }
                _ => 1,
            };
            // Library errors may quote a URL: never print its credentials.
            let e = crate::redact::redact_text(&format!("{e:#}"));
            tracing::error!(error = %e, "loansync failed");
            eprintln!("loansync: {e}");
            ExitCode::from(code)
        }
    }
}

/// The command as written, when it sends records to the analytics API and so needs its
/// settings ([`Settings::api`]) before it starts. `check` is not one: it reports a missing
/// API setting on its `api` line, which `--skip api` skips.
fn calls_api(command: &AppCommand) -> Option<&'static str> {
    match command {
        AppCommand::Worker => Some("worker"),
        // A dry run reads the database only.
        AppCommand::Sync {
            dry: args::DryRunArgs { dry_run: true, .. },
            ..
        } => None,
        AppCommand::Sync { .. } => Some("sync"),
        AppCommand::Resume {
            in_process: true, ..
        } => Some("resume --in-process"),
        AppCommand::Errors(ErrorsCommand::Retry {
            in_process: true, ..
        }) => Some("errors retry --in-process"),
        #[cfg(feature = "dev-tools")]
        AppCommand::Demo(_) => Some("demo"),
        // The stub takes the key it accepts from the settings, and has no URL to call.
        #[cfg(feature = "dev-tools")]
        AppCommand::StubApi(_) => None,
        #[cfg(feature = "dev-tools")]
        AppCommand::Seed(_) => None,
        AppCommand::Migrate
        | AppCommand::Planner
        | AppCommand::Trigger { .. }
        | AppCommand::Status { .. }
        | AppCommand::Resume { .. }
        | AppCommand::Abandon { .. }
        | AppCommand::Errors(ErrorsCommand::List { .. } | ErrorsCommand::Resolve { .. })
        | AppCommand::Errors(ErrorsCommand::Retry { .. })
        | AppCommand::Watermark(_)
        | AppCommand::Deletes(_) => None,
    }
}

/// Logging (at `default_filter` unless `RUST_LOG` says otherwise), the fail points and
/// the runtime: what a command that loaded its settings starts with.
fn start(settings: &Settings, default_filter: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    telemetry::init_logging(settings.log_format, default_filter);
    if let Err(e) = crate::failpoints::setup_from_env() {
        eprintln!("loansync: {}: {e}", crate::failpoints::ENV);
        return Err(ExitCode::from(1));
    }
    runtime()
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("loansync: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

fn print_check(report: &crate::check::Report, json: bool) {
    if json {
        println!("{}", report.render_json());
    } else {
        print!("{}", report.render_table());
    }
}

/// Prints `report` (its JSON with `json`) and returns its exit code.
fn emit(report: &impl Report, json: bool) -> anyhow::Result<u8> {
    report.print(json)?;
    Ok(report.exit_code())
}

/// `loansync probe`: the status on stdout and 0, or the status or error on stderr and 1.
async fn probe(url: &str, timeout: std::time::Duration) -> u8 {
    match crate::check::probe(url, timeout).await {
        Ok(status) => {
            println!("{status}");
            0
        }
        Err(e) => {
            eprintln!("loansync probe: {e}");
            1
        }
    }
}

async fn run(command: AppCommand, settings: Settings) -> anyhow::Result<u8> {
    let settings = Arc::new(settings);
    match command {
        AppCommand::Migrate => {
            let pool = db::connect(&settings).await?;
            db::migrate(&pool).await?;
            println!("migrations applied to {}", settings.database_url_redacted());
            Ok(0)
        }
        AppCommand::Planner => {
            app::run_planner_process(settings).await?;
            Ok(0)
        }
        AppCommand::Worker => {
            app::run_worker_process(settings).await?;
            Ok(0)
        }
        AppCommand::Trigger {
            selection,
            dry,
            request_id,
            since,
            until,
            wait,
            timeout,
            json,
        } => {
            let req = app::trigger::request(selection.request(request_id, since, until))
                .context("invalid planning message")?;
            // Computed here, as `sync --dry-run` does: no message is published, no
            // broker is connected to.
            if dry.dry_run {
                let pool = db::connect(&settings).await?;
                let report = app::dryrun::dry_run(&pool, &settings, &req, dry.ids).await?;
                return emit(&report, json);
            }
            // Connect to the database first: a --wait that cannot follow its request
            // publishes nothing.
            let pool = if wait {
                Some(db::connect(&settings).await?)
            } else {
                None
            };
            let published = app::trigger::publish(&settings, &req).await?;
            eprint!("{}", published.render());
            let Some(pool) = pool else {
                return Ok(published.exit_code());
            };
            let waited =
                app::wait_for_request(&pool, &published.request_id, timeout, WAIT_POLL, None)
                    .await?;
            emit(&waited, json)
        }
        AppCommand::Sync {
            selection,
            dry,
            json,
        } => {
            let pool = db::connect(&settings).await?;
            if dry.dry_run {
                let req = selection.request(None, None, None);
                let report = app::dryrun::dry_run(&pool, &settings, &req, dry.ids).await?;
                return emit(&report, json);
            }
            let work = Work::Plan(selection.request(None, None, None));
            let report = app::sync::run_in_process(&pool, &settings, work, !json).await?;
            emit(&report, json)
        }
        AppCommand::Status {
            sync_id,
            json,
            limit,
        } => {
            let pool = db::connect(&settings).await?;
            let stale = settings.stale_sync_after;
            let report = app::status::status(&pool, stale, sync_id.as_deref(), limit).await?;
            emit(&report, json)
        }
        AppCommand::Resume {
            sync_id,
            in_process: true,
            json,
        } => {
            let pool = db::connect(&settings).await?;
            let report = match app::sync::start(&pool, &settings, Work::Resume(sync_id)).await? {
                Started::Running(sync) => {
                    eprintln!(
                        "working {} unsettled chunks of sync {} in this process",
                        sync.chunks(),
                        sync.sync_id()
                    );
                    sync.run(false).await?
                }
                Started::Busy(report) => report,
            };
            emit(&report, json)
        }
        AppCommand::Resume { sync_id, json, .. } => {
            let pool = db::connect(&settings).await?;
            let report = app::resume::republish(&pool, &settings, sync_id).await?;
            emit(&report, json)
        }
        AppCommand::Abandon { sync_id, reason } => {
            let pool = db::connect(&settings).await?;
            let report = app::abandon::abandon(&pool, &sync_id, &reason).await?;
            emit(&report, false)
        }
        #[cfg(feature = "dev-tools")]
        AppCommand::Seed(args) => {
            let pool = db::connect(&settings).await?;
            if args.reset {
                crate::seed::reset_source(&pool, args.confirm_database.as_deref()).await?;
            }
            let report = crate::seed::seed(&pool, args.spec()).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        #[cfg(feature = "dev-tools")]
        AppCommand::Demo(args) => crate::demo::run(args, &settings).await,
        #[cfg(feature = "dev-tools")]
        AppCommand::StubApi(args) => {
            let addr = args.addr;
            let cfg = args.config(&settings)?;
            println!("stub analytics API listening on http://{addr}");
            crate::stub_api::run_standalone(cfg, addr, app::shutdown_signal()).await?;
            Ok(0)
        }
        AppCommand::Errors(cmd) => errors(cmd, &settings).await,
        AppCommand::Watermark(cmd) => watermark(cmd, &settings).await,
        AppCommand::Deletes(DeletesCommand::List {
            entity,
            limit,
            json,
        }) => {
            let pool = db::connect(&settings).await?;
            let report = app::deletes::list(&pool, entity, limit).await?;
            emit(&report, json)
        }
    }
}

async fn watermark(cmd: WatermarkCommand, settings: &Settings) -> anyhow::Result<u8> {
    let pool = db::connect(settings).await?;
    match cmd {
        WatermarkCommand::Show { json } => {
            let report = app::watermarks::show(&pool).await?;
            emit(&report, json)
        }
        WatermarkCommand::Set { entity, to, reason } => {
            let report = app::watermarks::set(&pool, entity, to, &reason).await?;
            emit(&report, false)
        }
    }
}

async fn errors(cmd: ErrorsCommand, settings: &Settings) -> anyhow::Result<u8> {
    let pool = db::connect(settings).await?;
    match cmd {
        ErrorsCommand::List {
            sync_id,
            entity,
            unresolved,
            limit,
            json,
        } => {
            let report =
                app::errors::list(&pool, sync_id.as_deref(), entity, unresolved, limit).await?;
            emit(&report, json)
        }
        ErrorsCommand::Resolve { ids } => {
            let report = app::errors::resolve(&pool, &ids).await?;
            emit(&report, false)
        }
        ErrorsCommand::Retry {
            entities,
            in_process,
        } => {
            let report = app::errors::retry(&pool, settings, entities, in_process).await?;
            emit(&report, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(args: &[&str]) -> AppCommand {
        match Cli::try_parse_from(args).expect("parses").command {
            Command::App(command) => command,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_dry_run_needs_no_api_settings() {
        let sync = app(&["loansync", "sync", "--full"]);
        assert_eq!(calls_api(&sync), Some("sync"));
        for dry in [
            &["loansync", "sync", "--full", "--dry-run"][..],
            &[
                "loansync",
                "sync",
                "--sweep",
                "--dry-run",
                "--ids",
                "--json",
            ],
            &["loansync", "trigger", "--dry-run"],
        ] {
            assert_eq!(calls_api(&app(dry)), None, "{dry:?}");
        }
    }
}

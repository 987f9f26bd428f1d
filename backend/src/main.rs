//! `backend`: load settings, set up logging, then serve (or migrate, or seed).

use std::process::ExitCode;

use clap::Parser;
use floodgate_backend::config::{Command, Settings};
use floodgate_backend::db::Db;
use floodgate_backend::startup::{shutdown_signal, Server};

/// glibc malloc was ~20% of the backend's CPU on `GET /items` under load (perf: malloc,
/// _int_malloc, malloc_consolidate, _int_free); mimalloc's thread-local heaps remove most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Demo users and keys, one per tier (`backend seed`). Not for production use.
const DEMO_KEYS: [(&str, &str, &str); 3] = [
    ("demo-free", "free", "fg_demo_free_key"),
    ("demo-pro", "pro", "fg_demo_pro_key"),
    ("demo-enterprise", "enterprise", "fg_demo_enterprise_key"),
];

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    env_logger::Builder::new()
        .filter_level(settings.log_level)
        .parse_env("RUST_LOG")
        .init();
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("backend: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    match settings.command.clone().unwrap_or(Command::Serve) {
        Command::Serve => {
            let server = Server::build(settings).await?;
            server.run(shutdown_signal()).await;
        }
        Command::Migrate => {
            let db = Db::connect(&settings.db())?;
            db.migrate().await?;
            println!("migrations applied ({})", db.engine());
        }
        Command::Seed => {
            let db = Db::connect(&settings.db())?;
            db.migrate().await?;
            for (user, tier, key) in DEMO_KEYS {
                db.upsert_user_key(user, tier, key).await?;
                println!("{tier:<10} user={user:<16} X-API-Key: {key}");
            }
        }
    }
    Ok(())
}

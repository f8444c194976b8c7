use clap::Parser;

use lookalike::config::{Cli, Command, LogFormat};
use lookalike::startup::{shutdown_signal, Application};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(config) => config.log_format,
        _ => LogFormat::Text,
    };
    lookalike::telemetry::init("info", log_format);
    match cli.command {
        Command::Serve(config) => {
            let app = Application::build(*config).await?;
            app.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Import(config) => {
            let summary = lookalike::import::run(&config).await?;
            print!("{}", summary.render());
        }
        Command::Migrate(config) => {
            let summary = lookalike::migrate::run(&config).await?;
            print!("{}", summary.render());
        }
        Command::Backup(config) => {
            let summary = tokio::task::spawn_blocking(move || lookalike::backup::backup(&config)).await??;
            print!("{}", summary.render());
        }
        Command::Restore(config) => {
            let summary = tokio::task::spawn_blocking(move || lookalike::backup::restore(&config)).await??;
            print!("{}", summary.render());
        }
        Command::Eval(config) => {
            let report = tokio::task::spawn_blocking(move || lookalike::eval::run(&config)).await??;
            print!("{}", lookalike::eval::render(&report));
        }
    }
    Ok(())
}

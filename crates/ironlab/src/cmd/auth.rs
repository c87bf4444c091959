//! `ironlab auth login|whoami|logout`.

use anyhow::Context;
use ironlab_api::v1::UserView;
use reqwest::Method;

use crate::cli::AuthCommand;
use crate::client::{self, Api, Config};

/// Runs an `auth` subcommand.
pub async fn run(
    cmd: AuthCommand,
    server: Option<String>,
    token: Option<String>,
) -> anyhow::Result<i32> {
    match cmd {
        AuthCommand::Login => {
            let server =
                server.context("`ironlab auth login` needs --server URL (or IRONLAB_SERVER)")?;
            let token =
                token.context("`ironlab auth login` needs --token TOKEN (or IRONLAB_TOKEN)")?;
            let api = Api::new(&server, &token)?;
            let me: UserView = api.call(Method::GET, "/me", None).await?;
            let path = client::save_config(&Config {
                server: api.server().to_string(),
                token,
            })?;
            println!("logged in to {} as {} ({})", api.server(), me.name, me.role);
            eprintln!("credentials stored in {}", path.display());
        }
        AuthCommand::Whoami => {
            let api = Api::from_flags(server, token)?;
            let me: UserView = api.call(Method::GET, "/me", None).await?;
            println!("{} ({}) on {}", me.name, me.role, api.server());
        }
        AuthCommand::Logout => {
            if client::remove_config()? {
                println!("logged out");
            } else {
                println!("not logged in");
            }
        }
    }
    Ok(0)
}

//! `ironlab user create` (admins).

use ironlab_api::v1::CreatedUser;
use reqwest::Method;
use serde_json::json;

use crate::cli::UserCommand;
use crate::client::Api;

/// Runs a `user` subcommand.
pub async fn run(cmd: UserCommand, api: &Api) -> anyhow::Result<i32> {
    match cmd {
        UserCommand::Create { name, admin } => {
            let role = if admin { "admin" } else { "user" };
            let created: CreatedUser = api
                .call(
                    Method::POST,
                    "/users",
                    Some(&json!({"name": name, "role": role})),
                )
                .await?;
            eprintln!(
                "created {} {} (id {})",
                created.user.role, created.user.name, created.user.id
            );
            println!("{}", created.token);
        }
    }
    Ok(0)
}

//! `ironlab user create|quota` (admins).

use ironlab_api::v1::{CreatedUser, StorageView};
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
        UserCommand::Author { name, revoke } => {
            let method = if revoke { Method::DELETE } else { Method::PUT };
            api.call_empty(method, &format!("/users/{name}/author"))
                .await?;
            eprintln!(
                "{name} {} a content author",
                if revoke { "is no longer" } else { "is now" }
            );
        }
        UserCommand::Quota { name, size } => {
            let bytes = if size == "default" {
                None
            } else {
                Some(
                    ironlab_spec::Size::parse(&size)
                        .map_err(|e| anyhow::anyhow!("{e}, or default"))?
                        .bytes(),
                )
            };
            let s: StorageView = api
                .call(
                    Method::PUT,
                    &format!("/users/{name}/storage-quota"),
                    Some(&json!({ "bytes": bytes })),
                )
                .await?;
            println!(
                "{name}: {} of {} used",
                crate::cmd::playground::human_bytes(s.used_bytes),
                crate::cmd::playground::human_bytes(s.quota_bytes)
            );
        }
    }
    Ok(0)
}

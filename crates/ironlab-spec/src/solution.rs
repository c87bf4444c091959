//! Solutions: the hidden script a solution bot types into a challenge's machines.
//!
//! A solution is Markdown (`solution.md`). Prose is ignored; every fenced code block whose info
//! string starts with `sh`, `bash` or `shell` is a chunk typed into a terminal, in order:
//!
//! ````markdown
//! ```sh machine=node-01 user=root
//! touch /tmp/ready
//! ```
//! ````
//!
//! `machine` defaults to the first machine, `user` to that machine's default user. A block whose
//! info string starts with `input` answers an input task the way a student does on the page:
//! ```` ```input task=answer ```` with the answer as the body (trailing newline removed). Other
//! blocks (```` ```yaml ````, plain ```` ``` ````) are documentation and are skipped.

use crate::{FieldError, Manifest, ManifestError};

/// One step of a solution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Shell text typed into a terminal of `machine` as `user`.
    Shell {
        /// Machine name (resolved: never empty after [`parse_solution`] with a manifest).
        machine: String,
        /// User name (resolved likewise).
        user: String,
        /// The text, each line ending in a newline.
        script: String,
        /// 1-based line of the opening fence.
        line: usize,
    },
    /// An answer for an input task.
    Input {
        /// The task.
        task: String,
        /// The answer.
        value: String,
        /// 1-based line of the opening fence.
        line: usize,
    },
}

/// A parsed solution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Solution {
    /// Steps, in document order.
    pub steps: Vec<Step>,
}

fn err(line: usize, message: impl Into<String>) -> FieldError {
    FieldError {
        path: format!("line {line}"),
        message: message.into(),
    }
}

/// Parses a solution and checks it against the playground it solves: machines, users and input
/// tasks must exist. Every problem is reported with its line.
pub fn parse_solution(text: &str, manifest: &Manifest) -> Result<Solution, ManifestError> {
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, l)) = lines.next() {
        let trimmed = l.trim_start();
        let indent = l.len() - trimmed.len();
        let fence_char = match trimmed.chars().next() {
            Some(c @ ('`' | '~')) if indent < 4 => c,
            _ => continue,
        };
        let fence_len = trimmed.chars().take_while(|c| *c == fence_char).count();
        if fence_len < 3 {
            continue;
        }
        let info = trimmed[fence_len..].trim();
        let line = i + 1;
        let mut body = String::new();
        let mut closed = false;
        for (_, l) in lines.by_ref() {
            let t = l.trim_start();
            if t.chars().take_while(|c| *c == fence_char).count() >= fence_len
                && t.trim_start_matches(fence_char).trim().is_empty()
            {
                closed = true;
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        if !closed {
            errors.push(err(line, "this code block is never closed"));
        }
        let mut words = info.split_whitespace();
        let lang = words.next().unwrap_or("");
        let attrs: Vec<&str> = words.collect();
        let attr = |key: &str| -> Option<String> {
            attrs
                .iter()
                .find_map(|a| a.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .map(|v| v.trim_matches('"').to_string())
        };
        let check_attrs = |allowed: &[&str], errors: &mut Vec<FieldError>| {
            for a in &attrs {
                let key = a.split('=').next().unwrap_or(a);
                if !a.contains('=') || !allowed.contains(&key) {
                    errors.push(err(
                        line,
                        format!(
                            "unknown attribute {a:?} (this block takes {})",
                            allowed
                                .iter()
                                .map(|k| format!("{k}=…"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        };
        match lang {
            "sh" | "bash" | "shell" => {
                check_attrs(&["machine", "user"], &mut errors);
                let machine = match attr("machine") {
                    Some(m) => m,
                    None => manifest
                        .playground
                        .machines
                        .first()
                        .map(|m| m.name.clone())
                        .unwrap_or_default(),
                };
                let Some(m) = manifest
                    .playground
                    .machines
                    .iter()
                    .find(|x| x.name == machine)
                else {
                    errors.push(err(line, format!("no machine named {machine:?}")));
                    continue;
                };
                let user = attr("user").unwrap_or_else(|| m.default_user().to_string());
                if user.is_empty()
                    || !user
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    errors.push(err(line, format!("user {user:?} is not a user name")));
                    continue;
                }
                if body.trim().is_empty() {
                    errors.push(err(line, "this shell block is empty"));
                    continue;
                }
                steps.push(Step::Shell {
                    machine,
                    user,
                    script: body,
                    line,
                });
            }
            "input" => {
                check_attrs(&["task"], &mut errors);
                let Some(task) = attr("task") else {
                    errors.push(err(
                        line,
                        "an input block names its task: ```input task=NAME",
                    ));
                    continue;
                };
                match manifest.playground.tasks.get(&task) {
                    Some(t) if t.input => {}
                    Some(_) => {
                        errors.push(err(line, format!("task {task:?} is not an input task")));
                        continue;
                    }
                    None => {
                        errors.push(err(line, format!("no task named {task:?}")));
                        continue;
                    }
                }
                let value = body.strip_suffix('\n').unwrap_or(&body).to_string();
                steps.push(Step::Input { task, value, line });
            }
            _ => {}
        }
    }
    if steps.is_empty() && errors.is_empty() {
        errors.push(err(
            1,
            "no ```sh (or ```input) blocks: a solution needs at least one step",
        ));
    }
    if errors.is_empty() {
        Ok(Solution { steps })
    } else {
        Err(ManifestError { errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        crate::parse_manifest(
            r#"
kind: playground
name: lab
title: Lab
playground:
  machines:
    - name: node-01
      drives: [{source: debian, mount: /, size: 1GiB}]
      users: [{name: laborant, default: true}]
    - name: node-02
      drives: [{source: debian, mount: /, size: 1GiB}]
  tasks:
    answer: {input: true, run: 'test "$INPUT" = 42'}
    check: {run: "true"}
"#,
        )
        .expect("manifest")
    }

    #[test]
    fn chunks_with_machine_user_and_inputs_in_order() {
        let text = "# Solution\n\nFirst:\n\n```sh\necho one\necho two\n```\n\n```yaml\nnot: run\n```\n\n\
                    ~~~bash machine=node-02 user=root\ntouch /x\n~~~\n\n```input task=answer\n42\n```\n";
        let s = parse_solution(text, &manifest()).expect("valid");
        assert_eq!(
            s.steps,
            vec![
                Step::Shell {
                    machine: "node-01".into(),
                    user: "laborant".into(),
                    script: "echo one\necho two\n".into(),
                    line: 5
                },
                Step::Shell {
                    machine: "node-02".into(),
                    user: "root".into(),
                    script: "touch /x\n".into(),
                    line: 14
                },
                Step::Input {
                    task: "answer".into(),
                    value: "42".into(),
                    line: 18
                },
            ]
        );
    }

    #[test]
    fn problems_name_the_line() {
        let text = "```sh machine=nope\nx\n```\n```sh colour=red\nx\n```\n```input task=check\n1\n```\n```input\n1\n```\n```sh\n";
        let e = parse_solution(text, &manifest()).expect_err("invalid");
        let all = e.to_string();
        assert!(all.contains("line 1: no machine named \"nope\""), "{all}");
        assert!(
            all.contains("line 4: unknown attribute \"colour=red\""),
            "{all}"
        );
        assert!(
            all.contains("line 7: task \"check\" is not an input task"),
            "{all}"
        );
        assert!(
            all.contains("line 10: an input block names its task"),
            "{all}"
        );
        assert!(
            all.contains("line 13: this code block is never closed"),
            "{all}"
        );
        let e = parse_solution("just prose\n", &manifest()).expect_err("empty");
        assert!(e.to_string().contains("at least one step"));
    }
}

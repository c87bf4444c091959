//! Validation of a task set and its effective dependency graph (explicit needs plus the implicit
//! need of every regular task on every init task of the machine).

use std::collections::{BTreeMap, BTreeSet};

use super::{TaskError, TaskSet};

/// `[a-z0-9_]+`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Each task's needs: its explicit ones, then (for tasks that are not init tasks) every init
/// task, without duplicates, in that order.
pub fn effective_needs(set: &TaskSet) -> BTreeMap<String, Vec<String>> {
    let inits: Vec<&str> = set
        .tasks
        .iter()
        .filter(|t| t.init)
        .map(|t| t.name.as_str())
        .collect();
    set.tasks
        .iter()
        .map(|t| {
            let mut needs = t.needs.clone();
            if !t.init {
                for i in &inits {
                    if !needs.iter().any(|n| n == i) {
                        needs.push((*i).to_string());
                    }
                }
            }
            (t.name.clone(), needs)
        })
        .collect()
}

/// Checks names, flags, needs and cycles; errors name the offending tasks.
pub fn validate(set: &TaskSet) -> Result<(), TaskError> {
    let bad = |m: String| Err(TaskError::Invalid(m));
    let mut names = BTreeSet::new();
    for t in &set.tasks {
        if !valid_name(&t.name) {
            return bad(format!("task name {:?} must match [a-z0-9_]+", t.name));
        }
        if !names.insert(t.name.as_str()) {
            return bad(format!("task {:?} is defined twice", t.name));
        }
        if t.run.trim().is_empty() {
            return bad(format!("task {:?} has an empty run script", t.name));
        }
        let flags = [t.init, t.input, t.helper].iter().filter(|f| **f).count();
        if flags > 1 {
            return bad(format!(
                "task {:?} can be only one of init, input and helper",
                t.name
            ));
        }
        for k in t.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return bad(format!("task {:?} has an invalid env name {k:?}", t.name));
            }
        }
    }
    for e in &set.external {
        if !valid_name(e) {
            return bad(format!("external need {e:?} must match [a-z0-9_]+"));
        }
        if names.contains(e.as_str()) {
            return bad(format!(
                "external need {e:?} is also a task of this machine"
            ));
        }
    }
    let helpers: BTreeSet<&str> = set
        .tasks
        .iter()
        .filter(|t| t.helper)
        .map(|t| t.name.as_str())
        .collect();
    for t in &set.tasks {
        for n in &t.needs {
            if *n == t.name {
                return bad(format!("task {:?} needs itself", t.name));
            }
            if helpers.contains(n.as_str()) {
                return bad(format!(
                    "task {:?} needs helper task {n:?}, which never completes",
                    t.name
                ));
            }
            if !names.contains(n.as_str()) && !set.external.iter().any(|e| e == n) {
                return bad(format!("task {:?} needs unknown task {n:?}", t.name));
            }
        }
    }
    if let Some(cycle) = find_cycle(&effective_needs(set)) {
        return bad(format!("tasks form a cycle: {}", cycle.join(" -> ")));
    }
    Ok(())
}

/// A cycle in `needs` (first node repeated at the end), if any. Unknown names are leaves.
pub fn find_cycle(needs: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'a>(
        n: &'a str,
        needs: &'a BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(n).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Open => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(n, Mark::Open);
        path.push(n);
        for d in needs.get(n).into_iter().flatten() {
            if needs.contains_key(d)
                && let Some(c) = visit(d, needs, marks, path)
            {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in needs.keys() {
        let mut path = Vec::new();
        if let Some(c) = visit(n, needs, &mut marks, &mut path) {
            return Some(c);
        }
    }
    None
}

//! The dependency tree in ARCHITECTURE.md, checked against `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};

/// Prints each package's `ddpm-*` dependencies and fails on any difference from ARCHITECTURE.md.
pub fn check() -> Result<()> {
    let real = workspace_dependencies()?;
    for (name, deps) in &real {
        let ours: Vec<&str> = deps
            .iter()
            .filter(|d| d.starts_with("ddpm-"))
            .map(String::as_str)
            .collect();
        println!("{name} ──> {}", ours.join(", "));
    }
    let text = std::fs::read_to_string(super::project_root().join("ARCHITECTURE.md"))
        .context("reading ARCHITECTURE.md")?;
    let diff = differences(&documented_tree(&text)?, &real);
    if !diff.is_empty() {
        bail!(
            "ARCHITECTURE.md's dependency tree is wrong:\n{}",
            diff.join("\n")
        );
    }
    println!("ARCHITECTURE.md's dependency tree matches cargo metadata");
    Ok(())
}

/// Each workspace package's normal (not dev, not build) dependencies, by name.
pub fn workspace_dependencies() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let out = std::process::Command::new(super::cargo_path())
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(super::project_root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut deps = BTreeMap::new();
    for package in meta["packages"].as_array().context("packages")? {
        let name = package["name"].as_str().context("name")?.to_string();
        let normal = package["dependencies"]
            .as_array()
            .context("dependencies")?
            .iter()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str().map(String::from))
            .collect();
        deps.insert(name, normal);
    }
    Ok(deps)
}

/// The lines `NAME ──> DEP, DEP (note), ...` of the first fenced block under `## Dependency
/// tree` in `text`, notes in brackets dropped.
pub fn documented_tree(text: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let section = text
        .split("## Dependency tree")
        .nth(1)
        .context("no \"## Dependency tree\" section")?;
    let block = section
        .split("```")
        .nth(1)
        .context("no fenced block in the dependency tree section")?;
    let mut tree = BTreeMap::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (name, deps) = line
            .split_once("──>")
            .with_context(|| format!("line without ──>: {line:?}"))?;
        let mut depth = 0;
        let plain: String = deps
            .chars()
            .filter(|&c| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0 && c != ')'
            })
            .collect();
        let deps = plain
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect();
        if tree.insert(name.trim().to_string(), deps).is_some() {
            bail!("{} is listed twice", name.trim());
        }
    }
    Ok(tree)
}

/// Every difference between the documented tree and the real one: a package missing from
/// the document, a `ddpm-*` dependency missing or extra, an external one that is not a
/// dependency.
pub fn differences(
    documented: &BTreeMap<String, BTreeSet<String>>,
    real: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, deps) in real {
        let Some(doc) = documented.get(name) else {
            out.push(format!("{name} is not in the tree"));
            continue;
        };
        for d in deps.iter().filter(|d| d.starts_with("ddpm-")) {
            if !doc.contains(d) {
                out.push(format!("{name} depends on {d}, the tree does not say so"));
            }
        }
        for d in doc.difference(deps) {
            out.push(format!("the tree says {name} depends on {d}; it does not"));
        }
    }
    for name in documented.keys().filter(|n| !real.contains_key(*n)) {
        out.push(format!(
            "the tree lists {name}, which is not a workspace package"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_dependency_tree_matches_cargo() {
        let text = std::fs::read_to_string(super::super::project_root().join("ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md");
        let documented = documented_tree(&text).expect("the tree parses");
        let real = workspace_dependencies().expect("cargo metadata");
        let diff = differences(&documented, &real);
        assert!(
            diff.is_empty(),
            "ARCHITECTURE.md's dependency tree:\n{}",
            diff.join("\n")
        );
    }

    #[test]
    fn a_wrong_tree_is_caught() {
        let real = BTreeMap::from([
            (
                "ddpm-a".to_string(),
                BTreeSet::from(["ddpm-b".to_string(), "x".to_string()]),
            ),
            ("ddpm-b".to_string(), BTreeSet::new()),
        ]);
        let text = "## Dependency tree\n\n```\nddpm-a ──> ddpm-b (the b), x\nddpm-b ──>\n```\n";
        assert!(differences(&documented_tree(text).unwrap(), &real).is_empty());
        let missing = "## Dependency tree\n```\nddpm-a ──> x\nddpm-b ──>\n```\n";
        let d = differences(&documented_tree(missing).unwrap(), &real);
        assert_eq!(d, ["ddpm-a depends on ddpm-b, the tree does not say so"]);
        let extra =
            "## Dependency tree\n```\nddpm-a ──> ddpm-b, y\nddpm-b ──> ddpm-a\nddpm-c ──>\n```\n";
        let d = differences(&documented_tree(extra).unwrap(), &real);
        assert_eq!(d.len(), 3, "{d:?}");
    }
}

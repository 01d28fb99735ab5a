//! The git side of `remote_git`: a mirror per repository, run as `git`
//! subprocesses under the build timeout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run;

pub(super) struct Mirror {
    dir: PathBuf,
    timeout: Duration,
}

/// `source.path` as git takes it: a URL as given, a relative path from the
/// plugin directory.
pub(super) fn url(path: &str, plugin_dir: &Path) -> String {
    let is_url = path.contains("://") || path.starts_with("git@");
    if is_url || Path::new(path).is_absolute() {
        path.to_owned()
    } else {
        plugin_dir.join(path).display().to_string()
    }
}

fn git(timeout: Duration, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("git");
    command.args(args).env("GIT_TERMINAL_PROMPT", "0");
    let output = run::run(&mut command, timeout)?;
    if !output.success {
        return Err(format!(
            "git {} failed: {}",
            args.iter().find(|a| !a.starts_with('-')).unwrap_or(&""),
            crate::text::printable(super::tail(&output.stderr, 10).trim(), 2048)
        ));
    }
    Ok(output.stdout)
}

impl Mirror {
    /// The mirror of `url` in `repo`: cloned the first time, fetched
    /// after. A failed fetch keeps what the mirror has (offline), with a
    /// warning: a commit built before still loads.
    pub(super) fn update(url: &str, repo: &Path, timeout: Duration) -> Result<Mirror, String> {
        let dir = repo.join("mirror.git");
        let text = |p: &Path| p.display().to_string();
        if dir.is_dir() {
            if let Err(e) = git(
                timeout,
                &[
                    "--git-dir",
                    &text(&dir),
                    "fetch",
                    "--quiet",
                    "--prune",
                    "origin",
                ],
            ) {
                tracing::warn!(%url, "using the cached mirror: {e}");
            }
        } else {
            let staging = repo.join(format!("mirror.tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&staging);
            git(
                timeout,
                &["clone", "--quiet", "--mirror", "--", url, &text(&staging)],
            )?;
            std::fs::rename(&staging, &dir).map_err(|e| format!("keeping the mirror: {e}"))?;
        }
        Ok(Mirror { dir, timeout })
    }

    /// The commit `rev` (a branch, tag or commit) names in the mirror.
    pub(super) fn resolve(&self, rev: &str) -> Result<String, String> {
        let spec = format!("{rev}^{{commit}}");
        let dir = self.dir.display().to_string();
        let commit = git(
            self.timeout,
            &["--git-dir", &dir, "rev-parse", "--verify", "--quiet", &spec],
        )
        .map_err(|_| {
            format!(
                "no commit `{}` in the repository",
                crate::text::printable(rev, 120)
            )
        })?;
        Ok(commit.trim().to_owned())
    }

    /// A work tree of `commit` at `dest`.
    pub(super) fn checkout(
        &self,
        commit: &str,
        dest: &Path,
        timeout: Duration,
    ) -> Result<(), String> {
        let (dir, dest) = (self.dir.display().to_string(), dest.display().to_string());
        git(
            timeout,
            &["clone", "--quiet", "--no-checkout", "--", &dir, &dest],
        )?;
        git(
            timeout,
            &["-C", &dest, "checkout", "--quiet", "--detach", commit],
        )?;
        Ok(())
    }
}

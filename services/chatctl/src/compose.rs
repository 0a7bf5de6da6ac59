//! The compose cluster (deploy/docker-compose.yml) as a [`Platform`]:
//! containers are found by their compose labels, restarted with `docker
//! restart` (SIGTERM, then SIGKILL after the grace), and healthy when
//! Docker's healthcheck says so. Store replicas are reached on the ports
//! the compose file publishes on 127.0.0.1.

use std::process::Command;

use anyhow::Context;

use crate::local::STOP_GRACE;
use crate::restart::{Platform, Tier};

pub struct Compose {
    /// The compose project name (`docker-compose -p`).
    pub project: String,
    /// Store replica addresses as published on this host.
    pub stores: Vec<String>,
    /// The operator identity for them (None: plaintext).
    pub tls: Option<std::sync::Arc<chat_security::Tls>>,
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run docker")?;
    anyhow::ensure!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Compose {
    /// The container of a compose service.
    fn container(&self, service: &str) -> anyhow::Result<String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let svc = format!("label=com.docker.compose.service={service}");
        let ids = docker(&["ps", "-a", "-q", "--filter", &project, "--filter", &svc])?;
        ids.lines().next().map(str::to_owned).with_context(|| {
            format!(
                "no container for service {service} in compose project {}",
                self.project
            )
        })
    }

    fn services(&self) -> Vec<String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let Ok(out) = docker(&[
            "ps",
            "-a",
            "--filter",
            &project,
            "--format",
            "{{.Label \"com.docker.compose.service\"}}",
        ]) else {
            return Vec::new();
        };
        let mut names: Vec<String> = out.lines().map(str::to_owned).collect();
        names.sort();
        names.dedup();
        names
    }
}

impl Platform for Compose {
    fn instances(&self, tier: Tier) -> Vec<String> {
        self.services()
            .into_iter()
            .filter(|n| crate::local::tier_of(n) == Some(tier))
            .collect()
    }

    fn store_addrs(&self) -> Vec<String> {
        self.stores.clone()
    }

    fn operator_tls(&self) -> Option<std::sync::Arc<chat_security::Tls>> {
        self.tls.clone()
    }

    async fn healthy(&self, _tier: Tier, name: &str) -> bool {
        let Ok(id) = self.container(name) else {
            return false;
        };
        docker(&["inspect", "-f", "{{.State.Health.Status}}", &id]).is_ok_and(|s| s == "healthy")
    }

    async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let id = self.container(name)?;
        let grace = STOP_GRACE.as_secs().to_string();
        tokio::task::spawn_blocking(move || docker(&["restart", "-t", &grace, &id]))
            .await
            .context("docker restart task")??;
        Ok(())
    }
}

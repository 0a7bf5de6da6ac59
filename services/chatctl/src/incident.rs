//! Incident notices: posted and resolved by operators, stored in the raft
//! store (the setting `incidents`), shown on the status page and pushed to
//! every subscriber as a status event.

use chat_proto::status::v1::{Incident, Incidents};
use chat_store::StoreClient;

use crate::plan::{now_ms, update_setting};

/// The setting holding them (read by routers).
pub const KEY: &str = "incidents";
/// Incidents kept (the oldest resolved ones go first).
const KEEP: usize = 50;

/// Posts a new open incident; returns it.
pub async fn post(store: &StoreClient, text: &str, by: &str) -> anyhow::Result<Incident> {
    let text = text.trim();
    anyhow::ensure!(!text.is_empty(), "the incident text is empty");
    anyhow::ensure!(
        text.len() <= 2_000,
        "the incident text is {} bytes; at most 2000",
        text.len()
    );
    let at = now_ms();
    let all = update_setting::<Incidents, _>(store, KEY, |current| {
        let mut list = current.cloned().unwrap_or_default().incidents;
        list.push(Incident {
            id: format!("inc-{at}"),
            text: text.to_owned(),
            posted_ms: at,
            resolved_ms: 0,
            posted_by: by.to_owned(),
        });
        while list.len() > KEEP {
            match list.iter().position(|i| i.resolved_ms != 0) {
                Some(p) => list.remove(p),
                None => list.remove(0),
            };
        }
        Ok(Incidents { incidents: list })
    })
    .await?;
    Ok(all.incidents.last().cloned().expect("just pushed"))
}

/// Resolves incident `id`, or the newest open one; returns it.
pub async fn resolve(store: &StoreClient, id: Option<&str>) -> anyhow::Result<Incident> {
    let at = now_ms();
    let all = update_setting::<Incidents, _>(store, KEY, |current| {
        let mut list = current.cloned().unwrap_or_default().incidents;
        let target = match id {
            Some(id) => list.iter_mut().find(|i| i.id == id),
            None => list.iter_mut().rev().find(|i| i.resolved_ms == 0),
        };
        let i = target.ok_or_else(|| match id {
            Some(id) => format!("no incident {id}"),
            None => "no open incident".to_owned(),
        })?;
        if i.resolved_ms != 0 {
            return Err(format!("incident {} is already resolved", i.id));
        }
        i.resolved_ms = at;
        Ok(Incidents { incidents: list })
    })
    .await?;
    all.incidents
        .into_iter()
        .find(|i| i.resolved_ms == at)
        .ok_or_else(|| anyhow::anyhow!("the resolved incident vanished"))
}

/// Every incident kept, oldest first.
pub async fn list(store: &StoreClient) -> anyhow::Result<Vec<Incident>> {
    Ok(crate::plan::read_setting::<Incidents>(store, KEY)
        .await?
        .map(|(_, i)| i.incidents)
        .unwrap_or_default())
}

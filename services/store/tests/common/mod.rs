//! Helpers shared by the store's integration tests.

#![allow(dead_code)]

use chat_proto::store::v1 as api;
use chat_store::StoreClient;

pub async fn create(client: &StoreClient, conv: &str, members: &[&str]) {
    client
        .create_conversation(api::CreateConversationRequest {
            conversation_id: conv.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        })
        .await
        .expect("create conversation");
}

pub fn append_req(conv: &str, sender: &str, id: &str) -> api::AppendRequest {
    api::AppendRequest {
        conversation_id: conv.into(),
        sender: sender.into(),
        client_msg_id: id.into(),
        body: format!("body of {id}").into_bytes(),
    }
}

/// Appends `n` messages `m0`.. from `sender`, each acknowledged in turn.
pub async fn append_n(client: &StoreClient, conv: &str, sender: &str, n: usize) {
    for i in 0..n {
        client
            .append(append_req(conv, sender, &format!("m{i}")))
            .await
            .expect("append");
    }
}

/// Every message of a conversation, through linearizable reads.
pub async fn read_all(client: &StoreClient, conv: &str) -> Vec<api::StoredMessage> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |m: &api::StoredMessage| m.seq);
        let page = client
            .read(api::ReadRequest {
                conversation_id: conv.into(),
                after_seq: after,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("read");
        if page.messages.is_empty() {
            return out;
        }
        out.extend(page.messages);
    }
}

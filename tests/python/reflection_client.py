"""Drives the chat API as a client that knows nothing of this project's
code: it discovers the API through server reflection (grpc.reflection
v1alpha, as Python's reflection client speaks it), builds every message from
the descriptors it was sent, and calls the gateway with grpcio.

Usage: reflection_client.py HOST:PORT ALICE_TOKEN BOB_TOKEN
Prints one line per step; exits non-zero with the reason on the first
failure.
"""

import random
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def fail(why):
    print(f"FAIL: {why}")
    sys.exit(1)


def main():
    addr, alice_token, bob_token = sys.argv[1:4]
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=10)

    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    print(f"services: {', '.join(services)}")
    if "chat.v1.Chat" not in services:
        fail("chat.v1.Chat is not listed")
    internal = [s for s in services if s.startswith("chat.") and s != "chat.v1.Chat"]
    if internal:
        fail(f"internal services listed: {internal}")

    pool = descriptor_pool.DescriptorPool(db)
    chat = pool.FindServiceByName("chat.v1.Chat")
    methods = {m.name: m for m in chat.methods}
    print(f"methods: {', '.join(sorted(methods))}")

    def message(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    def unary(name, token, **fields):
        m = methods[name]
        call = channel.unary_unary(
            f"/chat.v1.Chat/{name}",
            request_serializer=lambda r: r.SerializeToString(),
            response_deserializer=message(m.output_type.full_name).FromString,
        )
        request = message(m.input_type.full_name)(**fields)
        return call(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)

    conv = f"py-{random.randrange(1 << 30)}"
    created = unary("CreateConversation", alice_token, conversation_id=conv, members=["bob"])
    print(f"created {created.conversation_id} members={','.join(created.members)}")

    first = unary("Send", alice_token, conversation_id=conv, client_msg_id="py-1", body=b"hello from python")
    again = unary("Send", alice_token, conversation_id=conv, client_msg_id="py-1", body=b"hello from python")
    print(f"sent seq={first.seq}, retried seq={again.seq}")
    if first.seq != again.seq:
        fail(f"a retry stored the message again ({first.seq} then {again.seq})")

    # Many sends on one stream: a new message and a retry of the first.
    m = methods["SendStream"]
    frame_type = message(m.input_type.full_name)
    send_stream = channel.stream_stream(
        "/chat.v1.Chat/SendStream",
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=message(m.output_type.full_name).FromString,
    )
    frame = frame_type()
    for tag, (cid, body) in enumerate([("py-2", b"streamed from python"), ("py-1", b"hello from python")], 1):
        s = frame.sends.add()
        s.tag = tag
        s.send.conversation_id = conv
        s.send.client_msg_id = cid
        s.send.body = body
    acks = {}
    for ack_frame in send_stream(iter([frame]), metadata=[("authorization", f"Bearer {alice_token}")], timeout=10):
        for a in ack_frame.acks:
            if a.WhichOneof("outcome") != "ok":
                fail(f"streamed send {a.tag} refused: {a.error.code} {a.error.message}")
            acks[a.tag] = a.ok.seq
    print(f"streamed: {sorted(acks.items())}")
    if acks != {1: first.seq + 1, 2: first.seq}:
        fail(f"streamed acks {acks}, expected the new message after seq {first.seq} and the retry at it")

    history = unary("History", bob_token, conversation_id=conv, limit=10)
    bodies = [m.body for m in history.messages]
    print(f"history: {bodies}")
    if bodies != [b"hello from python", b"streamed from python"]:
        fail(f"history holds {bodies}")

    try:
        unary("History", bob_token, conversation_id="py-no-such-conversation", limit=10)
        fail("a missing conversation was read")
    except grpc.RpcError as e:
        print(f"missing conversation: {e.code().name}")
        if e.code() != grpc.StatusCode.NOT_FOUND:
            fail(f"a missing conversation gave {e.code().name}, not NOT_FOUND")

    try:
        unary("History", "not-a-token", conversation_id=conv, limit=10)
        fail("a bad token was accepted")
    except grpc.RpcError as e:
        print(f"bad token: {e.code().name}")
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            fail(f"a bad token gave {e.code().name}, not UNAUTHENTICATED")

    m = methods["Subscribe"]
    subscribe = channel.unary_stream(
        "/chat.v1.Chat/Subscribe",
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=message(m.output_type.full_name).FromString,
    )
    events = subscribe(
        message(m.input_type.full_name)(),
        metadata=[("authorization", f"Bearer {bob_token}")],
        timeout=15,
    )
    for ev in events:
        if ev.WhichOneof("kind") == "message" and ev.message.conversation_id == conv:
            print(f"subscribed: #{ev.message.seq} {ev.message.body!r}")
            if ev.message.body != b"hello from python":
                fail(f"the subscription delivered {ev.message.body!r}")
            events.cancel()
            break
    else:
        fail("the subscription ended without the message")
    print("OK")


if __name__ == "__main__":
    main()

"""An independent publisher: Python grpcio (gRPC C-core), with stubs generated
from api/proto/wakewire/publish/v1/publisher.proto by grpcio-tools. Run by
cli/tests/independent_clients.rs against a real relay process.

Checks what a backend sees: idempotent retries, clear errors, receipts; and
measures the delay of the first and later receipts on a WatchDeliveries
stream (printed as `measure ...` lines; the Rust test reports them, no timed
assertion).
"""

import argparse
import sys
import threading
import time

import grpc

sys.path.insert(0, sys.argv[sys.argv.index("--stubs") + 1])
from wakewire.publish.v1 import publisher_pb2 as pb  # noqa: E402
from wakewire.publish.v1 import publisher_pb2_grpc as rpc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--channel", required=True)
    ap.add_argument("--offline-channel", required=True)
    ap.add_argument("--measure-only", action="store_true", help="only the receipt timing (older relays)")
    a = ap.parse_args()
    md = [("authorization", "Bearer " + a.token)]
    stub = rpc.PublisherStub(grpc.insecure_channel(a.grpc))
    if not a.measure_only:
        checks(a, stub, md)
    receipts(a, stub, md)


def checks(a, stub, md):

    # Idempotent retry: same key, same request -> the first event, no second one.
    req = pb.PublishRequest(channel_id=a.channel, payload=b"py", idempotency_key="py-order-1")
    first = stub.Publish(req, metadata=md)
    again = stub.Publish(req, metadata=md)
    assert not first.duplicate, first
    assert again.duplicate and again.event_id == first.event_id, (first, again)
    print("ok idempotent retry", first.event_id, pb.DeliveryStatus.Name(again.status))

    # Same key, other request -> INVALID_ARGUMENT naming the key.
    try:
        stub.Publish(
            pb.PublishRequest(channel_id=a.channel, payload=b"other", idempotency_key="py-order-1"),
            metadata=md,
        )
        raise AssertionError("reused key accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert "idempotency_key" in e.details(), e.details()
    print("ok reused key refused")

    # An oversized collapse key is refused before anything is stored.
    try:
        stub.Publish(pb.PublishRequest(channel_id=a.channel, collapse_key="k" * 4096), metadata=md)
        raise AssertionError("huge collapse key accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    print("ok collapse key bounded")

    # No credential -> UNAUTHENTICATED.
    try:
        stub.Publish(req)
        raise AssertionError("no credential accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    print("ok unauthenticated")

    # PublishStream: a bidirectional stream from gRPC C-core; answers by
    # sequence number, a bad event answered in band, the stream goes on.
    def requests():
        yield pb.PublishStreamRequest(seq=7, event=pb.PublishRequest(channel_id=a.channel, payload=b"s7"))
        yield pb.PublishStreamRequest(seq=8, event=pb.PublishRequest(channel_id="not a channel id"))
        yield pb.PublishStreamRequest(seq=9, event=pb.PublishRequest(channel_id=a.channel, payload=b"s9"))

    answers = {r.seq: r.result for r in stub.PublishStream(requests(), metadata=md, timeout=20)}
    assert sorted(answers) == [7, 8, 9], answers
    for seq in (7, 9):
        assert answers[seq].error_code == 0 and answers[seq].response.event_id, answers[seq]
    assert answers[8].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answers[8]
    print("ok publish stream")


def receipts(a, stub, md):

    # Receipts. First: how long after a DELIVERED answer its receipt comes,
    # for the first receipt of a stream and the ones after (a first-write
    # delay such as Nagle's algorithm shows in the first).
    stream = stub.WatchDeliveries(pb.WatchDeliveriesRequest(), metadata=md)
    got = {}
    cond = threading.Condition()

    def read():
        try:
            for s in stream:
                with cond:
                    got[s.event_id] = (time.monotonic(), s)
                    cond.notify_all()
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    time.sleep(0.2)  # let the stream open (no receipt can be missed: none is due yet)

    def wait_for(ids, limit=20.0):
        end = time.monotonic() + limit
        with cond:
            while not all(e in got for e in ids):
                left = end - time.monotonic()
                assert left > 0, [e for e in ids if e not in got]
                cond.wait(left)

    lags = []
    for i in range(5):
        r = stub.Publish(pb.PublishRequest(channel_id=a.channel, payload=b"r%d" % i), metadata=md)
        answered = time.monotonic()
        assert r.status == pb.DELIVERY_STATUS_DELIVERED, r
        wait_for([r.event_id])
        lags.append((got[r.event_id][0] - answered) * 1000)
        assert got[r.event_id][1].state == pb.EVENT_STATE_DELIVERED
    print("measure receipt_lag_ms first=%.1f later=%s" % (lags[0], ",".join("%.1f" % x for x in lags[1:])))

    # Expiry receipts on the offline channel (ttl 1 s).
    sent = []
    for i in range(3):
        r = stub.Publish(
            pb.PublishRequest(channel_id=a.offline_channel, payload=b"e%d" % i, ttl_s=1),
            metadata=md,
        )
        assert r.status == pb.DELIVERY_STATUS_QUEUED, r
        sent.append(r.event_id)
    wait_for(sent)
    for e in sent:
        st = got[e][1]
        assert st.state == pb.EVENT_STATE_EXPIRED and st.reason == "ttl", st
    ev = stub.GetEvent(pb.GetEventRequest(event_id=sent[0]), metadata=md)
    assert ev.state == pb.EVENT_STATE_EXPIRED, ev
    print("ok receipts and GetEvent")
    stream.cancel()


if __name__ == "__main__":
    main()

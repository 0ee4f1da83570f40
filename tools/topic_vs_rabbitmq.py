"""Check Conveyor's topic matching against a live RabbitMQ, pair by pair.

    python tools/topic_vs_rabbitmq.py --amqp-url amqp://guest:guest@127.0.0.1/ [--seed 1]

Generates patterns and routing keys from a small word alphabet that includes the empty
word, ``*`` and ``#``, binds one RabbitMQ queue per pattern to a topic exchange, publishes
every key, and compares which queues each key reached with ``broker.topic.TopicTrie``.
Needs ``pip install aio-pika`` and a RabbitMQ (Debian: ``apt-get install rabbitmq-server``).
Exit status 0 when every pair agrees.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

from conveyor.broker.topic import TopicTrie

WORDS = ["", "a", "b", "c", "*", "#", "ab"]
KEY_WORDS = ["", "a", "b", "c", "ab", "*", "#"]


def gen(rng: random.Random, words: list[str], n: int, max_words: int) -> list[str]:
    out = {""}
    while len(out) < n:
        k = rng.randint(1, max_words)
        out.add(".".join(rng.choice(words) for _ in range(k)))
    return sorted(out)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1/")
    ap.add_argument("--patterns", type=int, default=400)
    ap.add_argument("--keys", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    opts = ap.parse_args()
    try:
        import aio_pika
    except ImportError:
        print("needs aio-pika: pip install aio-pika", file=sys.stderr)
        return 2
    rng = random.Random(opts.seed)
    patterns = gen(rng, WORDS, opts.patterns, 5)
    keys = gen(rng, KEY_WORDS, opts.keys, 5)
    trie: TopicTrie[int] = TopicTrie()
    for i, p in enumerate(patterns):
        trie.add(p, i)

    conn = await aio_pika.connect_robust(opts.amqp_url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.declare_exchange("topic-check", aio_pika.ExchangeType.TOPIC, auto_delete=True)
        queues = []
        for i, p in enumerate(patterns):
            q = await ch.declare_queue(f"topic-check-{i}", auto_delete=True, exclusive=True)
            await q.bind(ex, routing_key=p)
            queues.append(q)
        for k in keys:
            await ex.publish(aio_pika.Message(body=k.encode()), routing_key=k)
        got: dict[int, set[str]] = {}
        for i, q in enumerate(queues):
            s: set[str] = set()
            while True:
                msg = await q.get(no_ack=True, fail=False)
                if msg is None:
                    break
                s.add(msg.body.decode())
            got[i] = s
        await ex.delete()
    mismatches = 0
    for i, p in enumerate(patterns):
        for k in keys:
            ours = i in trie.match(k)
            theirs = k in got[i]
            if ours != theirs:
                mismatches += 1
                if mismatches <= 20:
                    print(f"MISMATCH pattern={p!r} key={k!r} conveyor={ours} rabbitmq={theirs}")
    pairs = len(patterns) * len(keys)
    matched = sum(len(v) for v in got.values())
    print(
        f"{pairs} pattern/key pairs ({len(patterns)} patterns x {len(keys)} keys), "
        f"{matched} matches in RabbitMQ, {mismatches} disagreements"
    )
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

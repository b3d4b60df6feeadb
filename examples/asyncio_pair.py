"""asyncio: a frontend waits for free grant refs and for the backend to let go, without blocking
the event loop.

Run: python examples/asyncio_pair.py
"""

from __future__ import annotations

import asyncio

import xengrant


async def main() -> None:
    with xengrant.EmbeddedXen(memory=64 << 20) as xen:
        front, back = xen.create_domain(), xen.create_domain()
        table = front.grant_table
        async with table.with_refs_async(2) as refs:  # waits (without blocking) for free refs
            pages = front.alloc_pages(2)
            for ref, gfn in zip(refs, pages.gfns):
                table.grant_access(ref, back.domid, gfn)
            mapping = back.gnttab.map_domain_grant_refs(front.domid, refs)
            mapping.mem[:2] = b"hi"

            async def backend_lets_go() -> None:
                await asyncio.sleep(0.01)
                mapping.unmap()

            # end_access_async retries while the backend still maps the page
            await asyncio.gather(
                backend_lets_go(),
                *(table.end_access_async(ref, timeout=10) for ref in refs),
            )
            assert bytes(pages.mem[:2]) == b"hi"
            pages.free()
        # share_pages' Share is an async context manager too: unshared on leaving
        async with table.share_pages(back.domid, count=1) as share:
            share.mem[:1] = b"x"
        back.gnttab.close()
    print("asyncio pair: ok")


if __name__ == "__main__":
    asyncio.run(main())

import pytest

import xengrant


def test_bad_ref_gives_holes_back():
    with xengrant.EmbeddedXen(memory=16 << 20) as xen:
        a, b = xen.create_domain(), xen.create_domain()
        before = b.get_pages(1)
        b.put_pages(before)
        with pytest.raises(ValueError, match="does not fit"):
            b.grant_table.map_grants([(a.domid, 1 << 40)])
        assert b.get_pages(1) == before

"""transformers' own model tests that fail under pyencoder by design, with the reason.

``EXPECTED[mode]`` maps a test id pattern (``Class::test_name``, ``*::test_name`` for every class of
the three families) to the reason. The harness marks them xfail(strict=True): they must fail, so
an entry that starts passing is reported and can be removed. Keep this list in sync with the
README table ("transformers' own tests").
"""

EXPECTED = {
    "patch": {},
    "registry": {},
    "none": {},
}


def expected_for(mode, nodeid):
    """The reason ``nodeid`` is expected to fail in ``mode``, or None."""
    cls_test = "::".join(nodeid.split("::")[-2:])
    test = cls_test.split("::")[-1].split("[")[0]
    cls = cls_test.split("::")[0]
    table = EXPECTED.get(mode, {})
    for key in (f"{cls}::{test}", f"*::{test}"):
        if key in table:
            return table[key]
    return None

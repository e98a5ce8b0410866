"""Free text from stored files is scanned in time that grows linearly with its length: a
crafted value cannot stall a de-identification job or a share preparation."""

from __future__ import annotations

import re
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from imageshare.deid.engine import mask_emails

# What an e-mail address looks like (the pattern the de-identifier used to run over text).
ADDRESS = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b")


def test_addresses_in_free_text_are_masked_and_the_rest_kept():
    text = "Report sent to jane.doe+us@nhs.example.co.uk; copy: r-smith@trust.nhs.uk. x@y"
    assert mask_emails(text) == "Report sent to *; copy: *. x@y"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab1._+-@ é\n", max_size=60))
def test_no_address_survives_the_scan(text):
    assert ADDRESS.search(mask_emails(text)) is None


def test_crafted_text_is_scanned_in_one_pass():
    # Half a million word starts before an '@' that never completes an address: a
    # backtracking scan tries each start against the whole rest (hours); one pass is instant.
    script = (
        "from imageshare.deid.engine import clean_text, mask_emails\n"
        "text = 'a.' * 500_000 + '@'\n"
        "assert mask_emails(text) == text\n"
        "assert mask_emails(text + 'x.org') == '*'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_share_addresses_are_checked_without_backtracking():
    from imageshare.domain.identifiers import is_email_address

    assert is_email_address("reviewer@trust.nhs.uk")
    for wrong in ("", "reviewer", "a@b", "@b.c", "a@b@c.d", "a b@c.d", "a@.b", "a@b.",
                  "x" * 250 + "@b.co"):
        assert not is_email_address(wrong), wrong

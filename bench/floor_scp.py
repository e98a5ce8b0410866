"""The floor for Python DIMSE ingest: a bare pynetdicom C-STORE SCP that writes and fsyncs each
received file and does nothing else. Usage: floor_scp.py PORT FOLDER"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    counter = [0]

    def on_store(event):
        counter[0] += 1
        path = folder / f"{counter[0]:08d}.dcm"
        with open(path, "wb") as fh:
            fh.write(event.encoded_dataset())
            fh.flush()
            os.fsync(fh.fileno())
        return 0x0000

    ae = AE(ae_title="FLOOR")
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()

"""DICOM networking: DIMSE (pynetdicom) and DICOMweb (requests) for send, receive, query, retrieve, delete.

Modules: :mod:`peers` (who to talk to, timeouts), :mod:`dimse` (SCU side), :mod:`scp` (the receiver),
:mod:`dicomweb` (QIDO/WADO/STOW), :mod:`ledger` (resumable sends), :mod:`admin` (deleting on a PACS).
"""

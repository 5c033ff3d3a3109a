"""A dcm-processor-style service for `kaapcli receive --rules settings.json`: a callback decides, workers work.

The callback and the workers are called with the keywords they name (headers, params, added_params,
jobName, series_dir, out, series_uid, ...) and return a bool or (bool, dict); the dict reaches the jobs
that depend on them as added_params.
"""

import json
from pathlib import Path


def is_ct(headers, params, added_params):
    wanted = headers.get("Modality") == "CT" and headers.get("instances", 0) >= params["min_instances"]
    return wanted, {"modality": headers.get("Modality"), "instances": headers.get("instances")}


def series_stats(jobName, headers, params, added_params, series_dir, out, series_uid):
    import pydicom

    files = sorted(Path(series_dir).glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    stats = {"job": jobName, "patient": headers["PatientID"], "instances": len(files),
             "grid": [int(first.Rows), int(first.Columns)], "decided": added_params}
    dest = Path(out, series_uid, "stats.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(stats, indent=1))
    return True, {"stats": str(dest), "instances": len(files)}


def report(added_params, out, series_uid):
    dest = Path(out, series_uid, "report.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(added_params, indent=1))
    return True

"""read_shard over 127.0.0.1 http, one 10^4-sample shard, with and without its index
sidecar, alternated: the read layer alone (no decode), i.e. the worst-case share."""

import subprocess
import sys
import time
import json
from pathlib import Path
from pixelbert_dist.data.streaming import read_shard
from pixelbert_dist.data import stream_check

cache = Path(sys.argv[1])
server = subprocess.Popen(
    [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(cache)],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
)
try:
    port = int(server.stdout.readline().split("port ")[1].split()[0])
    urls = {
        "sidecar": f"http://127.0.0.1:{port}/n10000/tiny-000000.tar",
        "no-sidecar": f"http://127.0.0.1:{port}/n10000-no-sidecar/tiny-000000.tar",
    }
    times = {k: [] for k in urls}
    fetch = []
    for _rep in range(7):
        for name, url in urls.items():
            start = time.perf_counter()
            raws = list(read_shard(url, 3, []))
            times[name].append(time.perf_counter() - start)
            assert len(raws) == 10000 and all(r.checked == (name == "sidecar") and r.damage is None for r in raws)
        start = time.perf_counter()
        stream_check.fetch(urls["sidecar"])
        fetch.append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(
        json.dumps(
            {
                "median_s": med,
                "ratio_with_over_without": round(med["sidecar"] / med["no-sidecar"], 3),
                "sidecar_fetch_median_s": sorted(fetch)[len(fetch) // 2],
                "all_s": times,
                "samples": 10000,
                "tar_bytes": (cache / "n10000/tiny-000000.tar").stat().st_size,
                "sidecar_bytes": (cache / "n10000/tiny-000000.idx.npy").stat().st_size,
            }
        )
    )
finally:
    server.terminate()
    server.wait(timeout=10)

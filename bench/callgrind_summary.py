#!/usr/bin/env python3
"""Summarise a callgrind dump of Sluice per request: by library (self) and by entry point (inclusive).

Usage: callgrind_summary.py FILE REQUESTS LABEL   (prints Markdown)
"""
import collections
import re
import subprocess
import sys

LINE = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)(?: \[(.*)\])?\s*$")

# Entry points worth a line, in reading order (inclusive cost: the function and all it calls).
ENTRY = [
    ("conn_read_cb", "client read → parse → whole request_handle (sluice http.c)"),
    ("request_handle", "request pipeline, up to the upstream start"),
    ("read_body", "validate the body: json_scan_body + checks (jansson only past its bounds)"),
    ("json_scan_body", "the validating scan: request body, and each plain usage object"),
    ("json_loadb", "jansson: every json_loadb (trees where needed, usage objects that are not plain)"),
    ("json_delete", "jansson: free the parsed request"),
    ("json_dumps", "jansson: re-serialise (only when the body changes)"),
    ("upstream_xfer_start", "set up the curl easy handle, add it, first socket_action"),
    ("curl_multi_socket_action", "libcurl: all socket_action calls (connection reuse, send, receive)"),
    ("curl_url_get", "  of which URL get (URL re-parsed per transfer)"),
    ("curl_url_set", "  of which URL set"),
    ("curl_maprintf", "  of which curl's internal aprintf"),
    ("curl_getenv", "  of which proxy environment lookups"),
    ("curl_easy_setopt", "libcurl: setopt calls"),
    ("curl_multi_add_handle", "libcurl: add handle"),
    ("curl_multi_remove_handle", "libcurl: remove handle"),
    ("curl_slist_append", "libcurl: request header list"),
    ("curl_slist_free_all", "libcurl: free header list"),
    ("header_cb", "upstream response headers (sluice)"),
    ("write_cb", "upstream body callback (sluice → request.c)"),
    ("sse_feed", "SSE parser, and per event everything below"),
    ("on_stream_event", "per event: usage check + forward"),
    ("usage_from_sse_data", "usage look-up in each event (null-usage tail, else search, then scan_members)"),
    ("usage_find", "key search (\"usage\"; the estimate's text keys), all callers"),
    ("memmem", "libc memmem (all callers)"),
    ("http_reply_chunk", "chunked write of one event"),
    ("check_done", "transfer completion → reply"),
    ("usage_from_body", "usage of a non-stream reply: scan_members + usage_from_span"),
    ("scan_members", "top-level JSON member scanner (usage.c)"),
    ("usage_from_span", "the usage object: walked in place (jansson when not plain)"),
    ("http_reply", "non-stream reply head + body"),
    ("http_response_header", "response header add"),
    ("request_finish", "request teardown"),
    ("snprintf", "libc snprintf (all callers)"),
    ("evbuffer_add_printf", "libevent printf (all callers)"),
    ("malloc", "libc malloc (all callers)"),
    ("free", "libc free (all callers)"),
    ("calloc", "libc calloc (all callers)"),
    ("realloc", "libc realloc (all callers)"),
    ("__memcpy_avx_unaligned_erms", "libc memcpy (all callers)"),
    ("epoll_wait", "epoll_wait (user side)"),
]


def annotate(path, inclusive):
    out = subprocess.run(["callgrind_annotate", "--auto=no", f"--inclusive={'yes' if inclusive else 'no'}",
                          "--threshold=100", path], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        rows.append((int(m.group(1).replace(",", "")), m.group(2), m.group(3) or ""))
    return rows


def lib_of(fn, obj):
    if obj:
        base = obj.rsplit("/", 1)[-1]
        return "sluice (our code)" if base == "sluice" else re.sub(r"\.so[.\d]*$", "", base)
    if fn.startswith("./"):  # glibc sources without an object column
        return "libc"
    if "jansson.h" in fn:
        return "libjansson"
    return "other"


def main():
    path, n, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    total = None
    with open(path) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    self_rows = annotate(path, False)
    # Frames that were on the stack when the counters were zeroed show the whole total as
    # "self" cost; they are bookkeeping, not work.
    self_rows = [r for r in self_rows if r[0] < 0.95 * total]
    by_lib = collections.Counter()
    for ir, fn, obj in self_rows:
        by_lib[lib_of(fn, obj)] += ir
    incl = {}
    for ir, fn, obj in annotate(path, True):
        name = fn.split(":", 1)[-1]
        incl.setdefault(name, ir)  # first (largest) wins

    print(f"**callgrind, {label}: {total / n:,.0f} instructions per request** ({n} requests after a warm-up)\n")
    print("| library (self cost) | instr/request | share |")
    print("|---|---:|---:|")
    for lib, ir in by_lib.most_common():
        if ir / n >= 50:
            print(f"| {lib} | {ir / n:,.0f} | {100 * ir / total:.1f} % |")
    print()
    print("| entry point (inclusive) | instr/request | share | what |")
    print("|---|---:|---:|---|")
    for name, what in ENTRY:
        if name in incl and incl[name] / n >= 100:
            print(f"| `{name}` | {incl[name] / n:,.0f} | {100 * incl[name] / total:.1f} % | {what} |")
    if "curl_multi_socket_action" in incl:
        own = incl["curl_multi_socket_action"] - incl.get("write_cb", 0) - incl.get("header_cb", 0)
        print(f"| libcurl proper (`curl_multi_socket_action` − our `write_cb` and `header_cb`) | "
              f"{own / n:,.0f} | {100 * own / total:.1f} % | the transfer itself |")
    print()
    print("| top functions (self cost) | instr/request |")
    print("|---|---:|")
    for ir, fn, obj in sorted(self_rows, reverse=True)[:15]:
        print(f"| `{fn.split(':', 1)[-1]}` ({lib_of(fn, obj)}) | {ir / n:,.0f} |")
    print()


if __name__ == "__main__":
    main()

"""Retrievers for the TriviaQA search loop, pluggable: anything with
`search(queries) -> list[str]` (one formatted observation per query).

- `HTTPRetriever`: the reference's protocol (data/utils/retrieval_utils.py, a
  Search-R1 style server): POST {"queries", "topk", "return_scores": true} to
  .../retrieve, read `result[i][j]["document"]["contents"]`.
- `BM25Retriever`: a local BM25 index (bm25s) over a JSONL corpus, one document
  per line with `contents` ("Title"\\ntext, the Search-R1 wiki layout) or `title`
  and `text`.
- `serve(retriever, host, port)`: the reference's HTTP endpoint in front of any
  retriever, so the reference code itself can run against a local corpus:
  `python -m memgen.eval.retrievers --corpus wiki.jsonl --port 8001`.

Documents are formatted as the reference does: "Doc {i}(Title: {first line}) {rest}\\n".
"""
from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from memgen.jsonl import iter_jsonl

REFERENCE_URL = "http://127.0.0.1:8001/retrieve"


class Retriever(Protocol):
    def search(self, queries: list[str]) -> list[str]: ...


def format_documents(contents: list[str]) -> str:
    out = ""
    for i, text in enumerate(contents, start=1):
        lines = text.split("\n")
        out += f"Doc {i}(Title: {lines[0]}) {chr(10).join(lines[1:])}\n"
    return out


class HTTPRetriever:
    def __init__(self, url: str = REFERENCE_URL, topk: int = 3, timeout: float = 60.0):
        self.url, self.topk, self.timeout = url, topk, timeout

    def retrieve(self, queries: list[str]) -> list[list[dict[str, Any]]]:
        body = json.dumps({"queries": queries, "topk": self.topk, "return_scores": True}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            result = json.loads(response.read())["result"]
        if not isinstance(result, list) or len(result) != len(queries):
            raise ValueError(f"{self.url} answered {len(result) if isinstance(result, list) else 'no'} results "
                             f"for {len(queries)} queries")
        return result

    def search(self, queries: list[str]) -> list[str]:
        # with return_scores each hit is {"document": {...}, "score": s}; without, the document itself
        return [format_documents([(hit["document"] if "document" in hit else hit)["contents"] for hit in hits])
                for hits in self.retrieve(queries)]

    def check(self) -> None:
        """One query, so a server that is not there stops the run before the model loads."""
        try:
            self.retrieve(["test"])
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"the retriever at {self.url} does not answer the reference's protocol ({e}); "
                               "start one (python -m memgen.eval.retrievers --corpus C.jsonl) or give "
                               "--retriever CORPUS.jsonl for a local BM25 index") from None


def read_corpus(path: str | Path) -> list[dict[str, Any]]:
    """Documents {"id", "contents"} of a JSONL corpus (`contents`, or `title` + `text`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file {str(path)!r}")
    docs = []
    for line_no, obj in iter_jsonl(path):
        if isinstance(obj, dict) and isinstance(obj.get("contents"), str):
            contents = obj["contents"]
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            contents = f'"{obj.get("title", "")}"\n{obj["text"]}'
        else:
            raise ValueError(f'{path}:{line_no}: a corpus line needs "contents", or "title" and "text"')
        docs.append({"id": str(obj.get("id", line_no - 1)), "contents": contents})
    if not docs:
        raise ValueError(f"{path}: the corpus is empty")
    return docs


class BM25Retriever:
    """bm25s's BM25 (Lucene's variant, k1=1.5, b=0.75) over English-stopworded tokens."""

    def __init__(self, corpus: str | Path | list[dict[str, Any]], topk: int = 3):
        try:
            import bm25s
        except ImportError:
            raise ImportError('a local BM25 retriever needs bm25s: pip install "memgen-engine[eval]"') from None
        self._bm25s = bm25s
        self.docs = read_corpus(corpus) if isinstance(corpus, (str, Path)) else list(corpus)
        self.topk = topk
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([d["contents"] for d in self.docs], stopwords="en", show_progress=False),
                         show_progress=False)

    def retrieve(self, queries: list[str], topk: int | None = None) -> list[list[dict[str, Any]]]:
        k = min(topk or self.topk, len(self.docs))
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        ids, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        # as a Lucene BM25 index: only documents sharing a term with the query (score > 0)
        return [[{"document": self.docs[int(i)], "score": float(s)} for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids, scores)]

    def search(self, queries: list[str]) -> list[str]:
        return [format_documents([hit["document"]["contents"] for hit in hits]) for hits in self.retrieve(queries)]


def make_retriever(spec: str, topk: int = 3):
    """A URL -> HTTPRetriever; a path -> BM25Retriever over that JSONL corpus."""
    if spec.startswith(("http://", "https://")):
        return HTTPRetriever(spec, topk)
    return BM25Retriever(spec, topk)


def serve(retriever: BM25Retriever, host: str = "127.0.0.1", port: int = 8001):
    """An HTTP server answering POST /retrieve as the reference's client expects.
    Returns the server (call serve_forever(), or shutdown() from another thread)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path.rstrip("/") != "/retrieve":
                return self._reply(404, {"error": "POST /retrieve"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                queries, topk = req["queries"], int(req.get("topk", retriever.topk))
                if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
                    raise ValueError('"queries" must be a list of strings')
            except (ValueError, KeyError, TypeError) as e:
                return self._reply(400, {"error": f"bad request: {e}"})
            hits = retriever.retrieve(queries, topk)
            if not req.get("return_scores", False):
                hits = [[h["document"] for h in row] for row in hits]
            self._reply(200, {"result": hits})

        def _reply(self, status: int, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):   # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memgen.eval.retrievers",
                                     description="serve a local BM25 index with the reference's POST /retrieve")
    parser.add_argument("--corpus", required=True, help="JSONL corpus: contents, or title + text, per line")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--topk", type=int, default=3)
    args = parser.parse_args(argv)
    server = serve(BM25Retriever(args.corpus, args.topk), args.host, args.port)
    print(f"serving {args.corpus} at http://{args.host}:{server.server_address[1]}/retrieve")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Item metadata: the pure ItemIndex over a Catalog, then GET /v1/items and /v1/items/{id} and the page's
files served by a real gateway process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.items import MAX_IDS, MAX_LIMIT, ItemIndex, ItemInfo
from recsys_cli.stack import Stack
from recsys_common.bundle import open_bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import InvalidRequest, NotFound
from recsys_common.features import ItemTables
from tests.web_bundle import film_metadata, make_film_bundle

N_ITEMS = 40


@pytest.fixture(scope="module")
def film_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("film-bundles")
    make_film_bundle(path, n_items=N_ITEMS)
    return path


@pytest.fixture(scope="module")
def index(film_bundles: Path) -> ItemIndex:
    bundle = open_bundle(film_bundles)
    return ItemIndex(bundle.version, Catalog.load(bundle), ItemTables.load(bundle).popularity)


# -- core ---------------------------------------------------------------------------------------


def test_get_returns_title_and_genres_and_unknown_is_not_found(index: ItemIndex) -> None:
    titles, genres = film_metadata(N_ITEMS)
    assert index.get("i003") == ItemInfo("i003", titles[2], tuple(genres[2]))
    assert index.get("i003").genres == ("Sci-Fi", "Thriller")
    with pytest.raises(NotFound, match="'nope'"):
        index.get("nope")
    with pytest.raises(InvalidRequest) as err:
        index.get("x" * 257)
    assert err.value.field == "item_id"


def test_search_matches_every_word_case_insensitively_most_popular_first(index: ItemIndex) -> None:
    titles, _ = film_metadata(N_ITEMS)
    hits = index.search("NEBULA", limit=MAX_LIMIT)
    # Every title holding the word, and only those; item 1 is the most popular, then popularity falls with the index.
    want = [f"i{i:03d}" for i in range(1, N_ITEMS + 1) if "nebula" in titles[i - 1].lower()]
    assert [h.item_id for h in hits] == want and len(want) >= 3
    both = index.search("nebula weekend", limit=MAX_LIMIT)
    assert [h.item_id for h in both] == [
        f"i{i:03d}" for i in range(1, N_ITEMS + 1) if titles[i - 1].startswith("Nebula Weekend")
    ]
    assert index.search("no such title") == []
    assert [h.item_id for h in index.search("nebula", limit=2)] == want[:2]


def test_search_puts_titles_that_start_with_the_query_first_then_popularity() -> None:
    titles = ("The Star", "Star Wars", "Lone Star", "Starman", "Heat")
    ids = tuple("abcde")
    catalog = Catalog(ids, titles, ((),) * 5, {item_id: n + 1 for n, item_id in enumerate(ids)})
    popularity = np.array([0, 5, 1, 4, 2, 3], dtype=np.float32)  # a most popular, then c, e, d, b
    index = ItemIndex("v", catalog, popularity)
    assert [h.title for h in index.search("star", limit=10)] == ["Starman", "Star Wars", "The Star", "Lone Star"]
    assert [h.title for h in index.search("  STAR  ", limit=10)] == ["Starman", "Star Wars", "The Star", "Lone Star"]
    assert [h.title for h in index.search("star wars", limit=10)] == ["Star Wars"]
    assert [h.title for h in index.search("", limit=10)] == ["The Star", "Lone Star", "Heat", "Starman", "Star Wars"]


def test_empty_query_lists_the_most_popular_and_ids_keep_their_order(index: ItemIndex) -> None:
    assert [h.item_id for h in index.search("", limit=3)] == ["i001", "i002", "i003"]
    got = index.search("", ids=["i010", "unknown", "i002", "i010"], limit=10)
    assert [h.item_id for h in got] == ["i010", "i002"]  # unknown and repeated ids left out, order kept
    assert [h.item_id for h in index.search("nebula", ids=["i002", "i001"])] == ["i001"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": MAX_LIMIT + 1}, "limit"),
        ({"limit": True}, "limit"),
        ({"query": "q" * 257}, "query"),
        ({"ids": ["i001"] * (MAX_IDS + 1)}, "ids"),
        ({"ids": ["i001", ""]}, "ids[1]"),
        ({"ids": ["x" * 257]}, "ids[0]"),
    ],
)
def test_search_refuses_bad_input_naming_the_field(index: ItemIndex, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        index.search(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


# -- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(film_bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    stack = Stack(film_bundles, tmp_path_factory.mktemp("state"), http_port=0, grpc_port=0)
    with stack, httpx.Client(base_url=stack.http_url, timeout=10) as c:
        yield c


def test_items_api_answers_search_batch_and_single_lookups(client: httpx.Client, index: ItemIndex) -> None:
    reply = client.get("/v1/items", params={"query": "nebula", "limit": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["bundle_version"] == index.version
    assert body["items"] == [
        {"item_id": h.item_id, "title": h.title, "genres": list(h.genres)} for h in index.search("nebula", limit=2)
    ]
    batch = client.get("/v1/items", params=[("ids", "i006"), ("ids", "zzz"), ("ids", "i001")]).json()
    assert [i["item_id"] for i in batch["items"]] == ["i006", "i001"]
    assert batch["items"][0]["genres"] == ["Comedy", "Romance"]
    one = client.get("/v1/items/i003")
    assert one.status_code == 200 and one.json() == {
        "item_id": "i003",
        "title": index.get("i003").title,
        "genres": ["Sci-Fi", "Thriller"],
    }


@pytest.mark.parametrize(
    ("path", "params", "status", "field"),
    [
        ("/v1/items", {"limit": "0"}, 422, "limit"),
        ("/v1/items", {"limit": str(MAX_LIMIT + 1)}, 422, "limit"),
        ("/v1/items", {"limit": "ten"}, 422, "limit"),
        ("/v1/items", {"query": "q" * 257}, 422, "query"),
        ("/v1/items", [("ids", "i001")] * (MAX_IDS + 1), 422, "ids"),
        ("/v1/items", [("ids", "i001"), ("ids", "")], 422, "ids[1]"),
        ("/v1/items/" + "x" * 257, None, 422, "item_id"),
        ("/v1/items/nope", None, 404, None),
    ],
)
def test_items_api_refuses_bad_input_with_a_4xx_naming_the_field(
    client: httpx.Client, path: str, params: object, status: int, field: str | None
) -> None:
    reply = client.get(path, params=params)  # type: ignore[arg-type]
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["field"] == field and error["message"]
    if status == 404:
        assert error["code"] == "not_found" and "nope" in error["message"]


def test_openapi_documents_the_items_api_with_examples(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    listing = spec["paths"]["/v1/items"]["get"]
    params = {p["name"]: p for p in listing["parameters"]}
    assert set(params) == {"query", "ids", "limit"}
    assert params["limit"]["schema"]["maximum"] == MAX_LIMIT and params["limit"]["schema"]["minimum"] == 1
    assert params["ids"]["schema"]["maxItems"] == MAX_IDS
    assert params["ids"]["schema"]["items"]["maxLength"] == 256
    assert params["query"]["examples"]["search"]["value"] == "star"
    assert "404" in spec["paths"]["/v1/items/{item_id}"]["get"]["responses"]
    assert "/" not in spec["paths"], "the page is not part of the API"


def test_the_page_and_its_assets_are_served_from_the_package(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text, "no external resources"
    web = Path(__file__).resolve().parent.parent / "gateway" / "web"
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = client.get(f"/web/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert asset.content == (web / name).read_bytes()
        assert "http://" not in asset.text and "https://" not in asset.text
    assert client.get("/web/%2e%2e/rest.py").status_code == 404

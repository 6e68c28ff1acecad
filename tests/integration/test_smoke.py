"""The basics a newcomer sees first: a request goes through and is logged."""

from support import Client, response


def test_get_through_errord(upstream, errord):
    up = upstream(lambda req: response(200, b'{"ok":true}', [("Content-Type", "application/json")]))
    e = errord(up.url)
    c = Client(e.port)
    r = c.get("/v1/items?x=1")
    assert r.status == 200
    assert r.body == b'{"ok":true}'
    assert r.header("content-type") == "application/json"
    assert up.requests[0].target == "/v1/items?x=1"
    rec = e.wait_access(1)[0]
    assert rec["status"] == 200 and rec["upstream_status"] == 200
    assert rec["method"] == "GET" and rec["path"] == "/v1/items?x=1"
    assert rec["request_id"] == r.header("x-request-id")
    c.close()


def test_mock_api_through_errord(mock_api, errord):
    e = errord(mock_api)
    c = Client(e.port)
    assert c.get("/v1/items/1").status == 200
    assert c.get("/v1/updates").status == 204
    r = c.get("/v1/forbidden")
    assert r.status == 403 and "message" in r.json()
    c.close()

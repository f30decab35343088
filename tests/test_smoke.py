import httpx

from tests.conftest import RunningServer


async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


def test_hello(serve) -> None:
    with serve(hello) as srv:
        assert isinstance(srv, RunningServer)
        response = httpx.get(srv.url)
        assert response.status_code == 200
        assert response.text == "hi"
        assert response.headers["content-length"] == "2"

"""The shortest path through the product: start, serve, status, upgrade, drain."""

from conftest import wait_until


def test_start_serve_upgrade_drain(start_appd):
    appd = start_appd("-w", "2")
    status, _, body = appd.get("/")
    assert status == 200 and b"generation 1" in body
    before = appd.serving_generation()
    code, result = appd.ctl_json("upgrade")
    assert code == 0, result
    after = appd.serving_generation()
    assert after["id"] == before["id"] + 1
    assert b"generation 2" in appd.get("/")[2]
    result = appd.ctl("drain")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: appd.proc.poll() is not None, 10, message="daemon exit")
    assert appd.proc.returncode == 0

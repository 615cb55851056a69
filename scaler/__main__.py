"""``python -m scaler``: the KEDA external scaler service (settings from PADDLEFN_SCALER_* variables)."""

from __future__ import annotations

import asyncio
import logging
import signal

from scaler.prometheus import PrometheusSource
from scaler.service import ScalerService
from scaler.settings import ScalerSettings


async def serve(settings: ScalerSettings) -> None:
    source = PrometheusSource(
        settings.prometheus_url,
        settings.prometheus_selector,
        settings.query_timeout_s,
        settings.prometheus_token,
        settings.activity_window_s,
    )
    service = ScalerService(settings, source)
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await service.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(ScalerSettings.from_env()))


if __name__ == "__main__":
    main()

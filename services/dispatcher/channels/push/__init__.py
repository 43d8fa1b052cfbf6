"""Mobile push through FCM HTTP v1 (Android and, through FCM, APNs)."""

from __future__ import annotations

from services.dispatcher.channels import ChannelKit
from services.dispatcher.channels.common import MonotonicClock
from services.dispatcher.channels.http import ProviderClient
from services.dispatcher.channels.push.adapter import PushSender
from services.dispatcher.channels.push.domain import render
from services.dispatcher.domain.messages import Provider
from services.dispatcher.settings import DispatcherSettings


def _provider(
    settings: DispatcherSettings, clock: MonotonicClock, http: ProviderClient
) -> Provider | None:
    # Without credentials a push send would only ever be a configuration error; leaving the
    # channel out skips push with a reason instead (and the priority list moves on).
    if settings.fcm_service_account_file is None:
        return None
    return PushSender(settings, http, clock)


KIT = ChannelKit("push", render, _provider)

"""One provider per channel, built from settings (push only when a service account is set)."""

from __future__ import annotations

import httpx

from services.dispatcher.adapters.email import SmtpSender
from services.dispatcher.adapters.push import PushSender
from services.dispatcher.adapters.sms import SmsSender
from services.dispatcher.adapters.wechat import WechatSender
from services.dispatcher.domain.channels import MonotonicClock
from services.dispatcher.domain.messages import Provider
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Channel


def build_providers(
    settings: DispatcherSettings, clock: MonotonicClock, http: httpx.AsyncClient
) -> dict[Channel, Provider]:
    providers: dict[Channel, Provider] = {
        "email": SmtpSender(settings, clock),
        "sms": SmsSender(settings, http),
        "wechat": WechatSender(settings, http, clock),
    }
    # Without credentials a push send would only ever be a configuration error; leaving the
    # channel out skips push with a reason instead (and the priority list moves on).
    if settings.fcm_service_account_file is not None:
        providers["push"] = PushSender(settings, http, clock)
    return providers

"""WeChat Official Account messages."""

from __future__ import annotations

from services.dispatcher.channels import ChannelKit
from services.dispatcher.channels.wechat.adapter import WechatSender
from services.dispatcher.channels.wechat.domain import render

KIT = ChannelKit(
    "wechat", render, lambda settings, clock, http: WechatSender(settings, http, clock)
)

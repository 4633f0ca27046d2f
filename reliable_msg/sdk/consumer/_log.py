"""The consumer SDK's one logger: every module of the package logs to it, under the name
users configure (``reliable_msg.sdk.consumer``) whichever module logs."""

import logging

log = logging.getLogger("reliable_msg.sdk.consumer")

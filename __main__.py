"""ipvs-ingress: nginx behind VIPs that an IPVS director forwards to the nodes (Direct Routing)."""

import pulumi

from components import kubeconfig
from components.admission import ExternalIPGuard
from components.config import KEYS, SECRET_KEY, TEXT_KEYS, ConfigError, load, path
from components.ingress import Ingress
from components.web_app import WebApp
from providers.model import _short

config = pulumi.Config()
try:
    cfg = load({key: (config.get if key in TEXT_KEYS else config.get_object)(key) for key in KEYS})
except ConfigError as err:
    # One line naming the field, the value and the fix; a traceback would only hide it.
    raise pulumi.RunError(str(err)) from None
except pulumi.ConfigTypeError as err:
    # Its own text holds the whole raw value: name the key and show only the start of it.
    fix = "write it as YAML structure under config: in the stack file (see README.md)"
    raise pulumi.RunError(f"{err.key}: {_short(err.value)} is not JSON: {fix}") from None

private_key = None
if cfg.bootstrap:
    private_key = config.get_secret(SECRET_KEY)
    if private_key is None:
        raise pulumi.RunError(
            f"{path(SECRET_KEY)}: not set, and director.bootstrap needs it: run "
            f"`pulumi config set --secret {SECRET_KEY} < ~/.ssh/id_ed25519`"
        )

web = None
if cfg.kubernetes:
    missing = kubeconfig.stack_problem()  # stop the preview, not pulumi-kubernetes mid-apply
    if missing:
        raise pulumi.RunError(missing)
    # The guard first: it must name the Service before the Service claims the VIPs.
    guard = [ExternalIPGuard("external-ip-guard", cfg)] if cfg.guard.enabled else []
    web = WebApp(
        cfg.app.name,
        cfg,
        instance=f"{cfg.app.name}-{pulumi.get_stack()}",
        opts=pulumi.ResourceOptions(depends_on=guard),
    )
service = web.service if web is not None else None
ingress = Ingress("ingress", cfg, service=service, private_key=private_key)

pulumi.export("vips", [vip.address for vip in cfg.vips])
pulumi.export("urls", list(cfg.urls))
pulumi.export("virtualServices", ingress.ipvsadm)
pulumi.export("realServerHealth", ingress.health)
if ingress.vip_holders is not None:  # several directors: which holds each VIP (VRRP)
    pulumi.export("vipHolders", ingress.vip_holders)
if web is not None:  # director side only: no Service, so no `service` output at all
    pulumi.export("service", web.service_name)

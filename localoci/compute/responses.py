"""Compute REST API: each handler parses a call, asks the compute model, renders the reply; the
route table (``ROUTES``) at the bottom says which call each handler serves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import invalid_parameter
from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public
from .models import SHAPES, instance_etag

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"


def launch_instance(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.launch(request.json(), fails=request.fail_resource)))


def get_instance(app: "LocalOCI", request: Request) -> Response:
    instance = public(app.compute.instance(request.params["instanceId"]))
    return Response.json(instance, headers={"etag": instance_etag(instance)})


def update_instance(app: "LocalOCI", request: Request) -> Response:
    """Rename or retag an instance; with ``if-match``, only while its ETag is still that one (412
    otherwise), so two callers that read the same instance cannot both change it."""
    instance = public(app.compute.update(request.params["instanceId"], request.json(),
                                         request.headers.get("if-match"), instance_etag))
    return Response.json(instance, headers={"etag": instance_etag(instance)})


def list_instances(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
              "displayName": "displayName", "lifecycleState": "lifecycleState"}
    return paged(request, (i for i in app.compute.instances.values() if matches(i, request.query, fields)), public)


def terminate_instance(app: "LocalOCI", request: Request) -> Response:
    app.compute.terminate(request.params["instanceId"],
                          preserve_boot_volume=request.query.get("preserveBootVolume", "false").lower() == "true")
    return Response.empty()


def instance_action(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.action(request.params["instanceId"], require(request, "action"))))


def list_devices(app: "LocalOCI", request: Request) -> Response:
    devices = app.compute.devices(request.params["instanceId"])
    wanted = request.query.get("isAvailable")
    if wanted is not None:
        devices = [d for d in devices if d["isAvailable"] == (wanted.lower() == "true")]
    if request.query.get("name"):
        devices = [d for d in devices if d["name"] == request.query["name"]]
    return paged(request, devices, dict)


def get_image(app: "LocalOCI", request: Request) -> Response:
    return Response.json(lookup(app.compute.images, request.params["imageId"], "Image"))


def list_images(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    return paged(request, app.compute.images.values(), dict)


def list_shapes(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    shapes = [{"shape": name, "ocpus": s["ocpus"], "memoryInGBs": s["memoryInGBs"],
               "isFlexible": s["flexible"], "processorDescription": "loopback"} for name, s in SHAPES.items()]
    return paged(request, shapes, dict)


def attach_volume(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.attach(request.json())))


def get_attachment(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.attachment(request.params["volumeAttachmentId"])))


def list_attachments(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
              "instanceId": "instanceId", "volumeId": "volumeId"}
    return paged(request, (a for a in app.compute.attachments.values() if matches(a, request.query, fields)), public)


def detach_volume(app: "LocalOCI", request: Request) -> Response:
    app.compute.detach(request.params["volumeAttachmentId"])
    return Response.empty()


def list_boot_attachments(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
              "instanceId": "instanceId", "bootVolumeId": "bootVolumeId"}
    return paged(request, (a for a in app.compute.store.values("boot_volume_attachments")
                           if matches(a, request.query, fields)), public)


def get_boot_attachment(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.boot_attachment(request.params["bootVolumeAttachmentId"])))


def attach_boot_volume(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.attach_boot_volume(request.json())))


def detach_boot_volume(app: "LocalOCI", request: Request) -> Response:
    app.compute.detach_boot_volume(request.params["bootVolumeAttachmentId"])
    return Response.empty()


def capture_console_history(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.capture_console_history(request.json())))


def get_console_history(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.compute.console_history(request.params["instanceConsoleHistoryId"])))


def list_console_histories(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
              "instanceId": "instanceId", "lifecycleState": "lifecycleState"}
    return paged(request, (h for h in app.compute.store.values("console_histories")
                           if matches(h, request.query, fields)), public)


def console_history_content(app: "LocalOCI", request: Request) -> Response:
    try:
        offset = int(request.query.get("offset", "0"))
        length = int(request.query.get("length", "10240"))
    except ValueError:
        raise invalid_parameter("offset and length must be whole numbers.") from None
    data = app.compute.console_history_content(request.params["instanceConsoleHistoryId"], offset, length)
    return Response(200, data, {"Content-Type": "application/octet-stream"})


def delete_console_history(app: "LocalOCI", request: Request) -> Response:
    app.compute.delete_console_history(request.params["instanceConsoleHistoryId"])
    return Response.empty()


INSTANCE = BASE + "/instances/{instanceId}"
ATTACHMENT = BASE + "/volumeAttachments/{volumeAttachmentId}"
BOOT_ATTACHMENT = BASE + "/bootVolumeAttachments/{bootVolumeAttachmentId}"
HISTORY = BASE + "/instanceConsoleHistories/{instanceConsoleHistoryId}"
ROUTES = [
    Route("POST", BASE + "/instances", launch_instance, "LaunchInstance", retry_token=True),
    Route("GET", BASE + "/instances", list_instances, "ListInstances"),
    Route("GET", INSTANCE, get_instance, "GetInstance"),
    Route("PUT", INSTANCE, update_instance, "UpdateInstance"),
    Route("DELETE", INSTANCE, terminate_instance, "TerminateInstance"),
    Route("POST", INSTANCE, instance_action, "InstanceAction", retry_token=True),
    Route("GET", INSTANCE + "/devices", list_devices, "ListInstanceDevices"),
    Route("GET", BASE + "/images", list_images, "ListImages"),
    Route("GET", BASE + "/images/{imageId}", get_image, "GetImage"),
    Route("GET", BASE + "/shapes", list_shapes, "ListShapes"),
    Route("POST", BASE + "/volumeAttachments", attach_volume, "AttachVolume", retry_token=True),
    Route("GET", BASE + "/volumeAttachments", list_attachments, "ListVolumeAttachments"),
    Route("GET", ATTACHMENT, get_attachment, "GetVolumeAttachment"),
    Route("DELETE", ATTACHMENT, detach_volume, "DetachVolume"),
    Route("POST", BASE + "/bootVolumeAttachments", attach_boot_volume, "AttachBootVolume", retry_token=True),
    Route("GET", BASE + "/bootVolumeAttachments", list_boot_attachments, "ListBootVolumeAttachments"),
    Route("GET", BOOT_ATTACHMENT, get_boot_attachment, "GetBootVolumeAttachment"),
    Route("DELETE", BOOT_ATTACHMENT, detach_boot_volume, "DetachBootVolume"),
    Route("POST", BASE + "/instanceConsoleHistories", capture_console_history, "CaptureConsoleHistory",
          retry_token=True),
    Route("GET", BASE + "/instanceConsoleHistories", list_console_histories, "ListConsoleHistories"),
    Route("GET", HISTORY, get_console_history, "GetConsoleHistory"),
    Route("GET", HISTORY + "/data", console_history_content, "GetConsoleHistoryContent"),
    Route("DELETE", HISTORY, delete_console_history, "DeleteConsoleHistory"),
]

"""Compute REST API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import invalid_parameter
from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public
from .models import SHAPES

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"


def routes(app: "LocalOCI") -> list[Route]:
    compute = app.compute

    def launch_instance(request: Request) -> Response:
        return Response.json(public(compute.launch(request.json(), fails=request.fail_resource)))

    def get_instance(request: Request) -> Response:
        return Response.json(public(compute.instance(request.params["instanceId"])))

    def list_instances(request: Request) -> Response:
        require(request, "compartmentId")
        fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                  "displayName": "displayName", "lifecycleState": "lifecycleState"}
        return paged(request, (i for i in compute.instances.values() if matches(i, request.query, fields)), public)

    def terminate_instance(request: Request) -> Response:
        compute.terminate(request.params["instanceId"],
                          preserve_boot_volume=request.query.get("preserveBootVolume", "false").lower() == "true")
        return Response.empty()

    def instance_action(request: Request) -> Response:
        return Response.json(public(compute.action(request.params["instanceId"], require(request, "action"))))

    def list_devices(request: Request) -> Response:
        devices = compute.devices(request.params["instanceId"])
        wanted = request.query.get("isAvailable")
        if wanted is not None:
            devices = [d for d in devices if d["isAvailable"] == (wanted.lower() == "true")]
        if request.query.get("name"):
            devices = [d for d in devices if d["name"] == request.query["name"]]
        return paged(request, devices, dict)

    def get_image(request: Request) -> Response:
        return Response.json(lookup(compute.images, request.params["imageId"], "Image"))

    def list_images(request: Request) -> Response:
        require(request, "compartmentId")
        return paged(request, compute.images.values(), dict)

    def list_shapes(request: Request) -> Response:
        require(request, "compartmentId")
        shapes = [{"shape": name, "ocpus": s["ocpus"], "memoryInGBs": s["memoryInGBs"],
                   "isFlexible": s["flexible"], "processorDescription": "loopback"} for name, s in SHAPES.items()]
        return paged(request, shapes, dict)

    def attach_volume(request: Request) -> Response:
        return Response.json(public(compute.attach(request.json())))

    def get_attachment(request: Request) -> Response:
        return Response.json(public(compute.attachment(request.params["volumeAttachmentId"])))

    def list_attachments(request: Request) -> Response:
        require(request, "compartmentId")
        fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                  "instanceId": "instanceId", "volumeId": "volumeId"}
        return paged(request, (a for a in compute.attachments.values() if matches(a, request.query, fields)), public)

    def detach_volume(request: Request) -> Response:
        compute.detach(request.params["volumeAttachmentId"])
        return Response.empty()

    def list_boot_attachments(request: Request) -> Response:
        require(request, "compartmentId")
        fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                  "instanceId": "instanceId", "bootVolumeId": "bootVolumeId"}
        return paged(request, (a for a in compute.store.values("boot_volume_attachments")
                               if matches(a, request.query, fields)), public)

    def get_boot_attachment(request: Request) -> Response:
        return Response.json(public(compute.boot_attachment(request.params["bootVolumeAttachmentId"])))

    def attach_boot_volume(request: Request) -> Response:
        return Response.json(public(compute.attach_boot_volume(request.json())))

    def detach_boot_volume(request: Request) -> Response:
        compute.detach_boot_volume(request.params["bootVolumeAttachmentId"])
        return Response.empty()

    def capture_console_history(request: Request) -> Response:
        return Response.json(public(compute.capture_console_history(request.json())))

    def get_console_history(request: Request) -> Response:
        return Response.json(public(compute.console_history(request.params["instanceConsoleHistoryId"])))

    def list_console_histories(request: Request) -> Response:
        require(request, "compartmentId")
        fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                  "instanceId": "instanceId", "lifecycleState": "lifecycleState"}
        return paged(request, (h for h in compute.store.values("console_histories")
                               if matches(h, request.query, fields)), public)

    def console_history_content(request: Request) -> Response:
        try:
            offset = int(request.query.get("offset", "0"))
            length = int(request.query.get("length", "10240"))
        except ValueError:
            raise invalid_parameter("offset and length must be whole numbers.") from None
        data = compute.console_history_content(request.params["instanceConsoleHistoryId"], offset, length)
        return Response(200, data, {"Content-Type": "application/octet-stream"})

    def delete_console_history(request: Request) -> Response:
        compute.delete_console_history(request.params["instanceConsoleHistoryId"])
        return Response.empty()

    return [
        Route("POST", BASE + "/instances", launch_instance, "LaunchInstance", retry_token=True),
        Route("GET", BASE + "/instances", list_instances, "ListInstances"),
        Route("GET", BASE + "/instances/{instanceId}", get_instance, "GetInstance"),
        Route("DELETE", BASE + "/instances/{instanceId}", terminate_instance, "TerminateInstance"),
        Route("POST", BASE + "/instances/{instanceId}", instance_action, "InstanceAction", retry_token=True),
        Route("GET", BASE + "/instances/{instanceId}/devices", list_devices, "ListInstanceDevices"),
        Route("GET", BASE + "/images", list_images, "ListImages"),
        Route("GET", BASE + "/images/{imageId}", get_image, "GetImage"),
        Route("GET", BASE + "/shapes", list_shapes, "ListShapes"),
        Route("POST", BASE + "/volumeAttachments", attach_volume, "AttachVolume", retry_token=True),
        Route("GET", BASE + "/volumeAttachments", list_attachments, "ListVolumeAttachments"),
        Route("GET", BASE + "/volumeAttachments/{volumeAttachmentId}", get_attachment, "GetVolumeAttachment"),
        Route("DELETE", BASE + "/volumeAttachments/{volumeAttachmentId}", detach_volume, "DetachVolume"),
        Route("POST", BASE + "/bootVolumeAttachments", attach_boot_volume, "AttachBootVolume", retry_token=True),
        Route("GET", BASE + "/bootVolumeAttachments", list_boot_attachments, "ListBootVolumeAttachments"),
        Route("GET", BASE + "/bootVolumeAttachments/{bootVolumeAttachmentId}", get_boot_attachment,
              "GetBootVolumeAttachment"),
        Route("DELETE", BASE + "/bootVolumeAttachments/{bootVolumeAttachmentId}", detach_boot_volume, "DetachBootVolume"),
        Route("POST", BASE + "/instanceConsoleHistories", capture_console_history, "CaptureConsoleHistory",
              retry_token=True),
        Route("GET", BASE + "/instanceConsoleHistories", list_console_histories, "ListConsoleHistories"),
        Route("GET", BASE + "/instanceConsoleHistories/{instanceConsoleHistoryId}", get_console_history,
              "GetConsoleHistory"),
        Route("GET", BASE + "/instanceConsoleHistories/{instanceConsoleHistoryId}/data", console_history_content,
              "GetConsoleHistoryContent"),
        Route("DELETE", BASE + "/instanceConsoleHistories/{instanceConsoleHistoryId}", delete_console_history,
              "DeleteConsoleHistory"),
    ]

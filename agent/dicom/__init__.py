"""The DICOM node: the acceptor side of the DICOM upper layer (PS3.8) and the
storage SCP behind it, built on pynetdicom's public PDU and negotiation code.

    transport   listeners, DICOM TLS, reading and writing PDUs within deadlines
    admission   per-peer connection and association bounds, rate limits
    negotiation presentation contexts we accept, and in which transfer syntax
    acceptor    one association, one thread: the PS3.8 acceptor state machine
    dimse       DIMSE messages on the P-DATA stream: C-STORE streamed, C-ECHO,
                a registry for other services, 0x0211 for the rest
    header      the few header elements a data set is routed by
    sink        where a C-STORE data set streams to (the encrypted inbox)
    scp         store decisions, counters and audit records of the node
    mpps        Modality Performed Procedure Step SCP (N-CREATE, N-SET)
    commitment_scp  Storage Commitment Push Model SCP (N-ACTION, the report back)
    commitment  Storage Commitment reports a PACS sends for our own requests
    services    registers MPPS and commitment SCP on a handler registry
    node        the node's interface, and the node that receives in-process
    pool        receive worker processes (main-process half)
    worker      a receive worker process

May import: agent.config, agent.errors, agent.crypto, agent.logs, agent.pixelbound,
agent.store (the inbox it streams into), agent.ops (liveness). Must not import the
uplink, deid, infer, results, audit (audit records leave through callbacks and the
inbox's receipt journal) or the wiring (daemon, pipeline): the node hands received
instances on, it never reaches forward.
"""

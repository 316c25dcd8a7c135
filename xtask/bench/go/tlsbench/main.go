// tlsbench is the peer `cargo xtask bench auth` measures Tessera's agent
// handshakes against: Go crypto/tls doing the same mutual TLS 1.3 handshake
// (ECDSA P-256 SVIDs from the same files, P-256 key exchange, no resumption, the
// responder's SPIFFE ID checked) between a client and a server in one
// process, sequentially, over loopback, a TCP connection per handshake.
// With -verdict it does the agents' whole work: the server fails on its own
// handshake errors and, once it has verified the client, sends a one-byte
// verdict the client waits for (in TLS 1.3 a client's handshake ends before
// the server has checked its certificate). Run it with GOMAXPROCS=1 for
// one core. It prints {"per_second", "p50_ms", "p99_ms", "count"} as JSON.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"time"
)

func load(dir, name string) tls.Certificate {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key"))
	if err != nil {
		fail(err)
	}
	return cert
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "tlsbench:", err)
	os.Exit(1)
}

// expect checks the peer's single URI SAN, as the agents do.
func expect(id string) func([][]byte, [][]*x509.Certificate) error {
	return func(_ [][]byte, chains [][]*x509.Certificate) error {
		if len(chains) == 0 || len(chains[0][0].URIs) != 1 || chains[0][0].URIs[0].String() != id {
			return errors.New("unexpected peer identity")
		}
		return nil
	}
}

func main() {
	dir := flag.String("dir", "", "directory with ca.pem, client.{pem,key}, server.{pem,key}")
	seconds := flag.Float64("seconds", 5, "how long to measure")
	clientID := flag.String("client-id", "", "the client's SPIFFE ID")
	serverID := flag.String("server-id", "", "the server's SPIFFE ID")
	verdict := flag.Bool("verdict", false, "the server answers a verified client, the client waits for it")
	flag.Parse()

	caPEM, err := os.ReadFile(filepath.Join(*dir, "ca.pem"))
	if err != nil {
		fail(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		fail(errors.New("no CA in ca.pem"))
	}
	groups := []tls.CurveID{tls.CurveP256} // the agents' key exchange group
	server := &tls.Config{
		MinVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{load(*dir, "server")},
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              roots,
		CurvePreferences:       groups,
		SessionTicketsDisabled: true,
		VerifyPeerCertificate:  expect(*clientID),
	}
	client := &tls.Config{
		MinVersion:            tls.VersionTLS13,
		Certificates:          []tls.Certificate{load(*dir, "client")},
		RootCAs:               roots,
		CurvePreferences:      groups,
		InsecureSkipVerify:    true, // the chain and the SPIFFE ID are checked below, not a DNS name
		VerifyPeerCertificate: verifyChain(roots, *serverID),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				t := tls.Server(c, server)
				err := t.Handshake()
				if *verdict {
					if err != nil {
						fail(err)
					}
					if _, err := t.Write([]byte{0}); err != nil {
						fail(err)
					}
				}
				t.Close()
			}(c)
		}
	}()
	one := func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			fail(err)
		}
		t := tls.Client(c, client)
		if err := t.Handshake(); err != nil {
			fail(err)
		}
		if *verdict {
			answer := make([]byte, 1)
			if _, err := t.Read(answer); err != nil {
				fail(err)
			}
		}
		t.Close()
	}
	for i := 0; i < 20; i++ {
		one()
	}
	var lat []time.Duration
	start := time.Now()
	for time.Since(start).Seconds() < *seconds {
		t := time.Now()
		one()
		lat = append(lat, time.Since(t))
	}
	total := time.Since(start)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	at := func(p float64) float64 {
		i := int(p/100*float64(len(lat)-1) + 0.5)
		return float64(lat[i].Nanoseconds()) / 1e6
	}
	out, _ := json.Marshal(map[string]float64{
		"per_second": float64(len(lat)) / total.Seconds(),
		"p50_ms":     at(50),
		"p99_ms":     at(99),
		"count":      float64(len(lat)),
	})
	fmt.Println(string(out))
}

// verifyChain verifies the server's chain against roots (no DNS name) and its SPIFFE ID.
func verifyChain(roots *x509.CertPool, id string) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		certs := make([]*x509.Certificate, len(raw))
		for i, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return err
			}
			certs[i] = c
		}
		if len(certs) == 0 {
			return errors.New("no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		chains, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		if err != nil {
			return err
		}
		return expect(id)(raw, chains)
	}
}
